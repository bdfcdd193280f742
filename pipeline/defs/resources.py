"""The resources every run gets, and the executor."""

import dagster as dg

from pipeline.executors import executor_from_env
from pipeline.resources import ComputeResource, MLflowResource, StorageResource
from pipeline.validation import RunConfigCheck


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={
            "mlflow": MLflowResource(),
            "storage": StorageResource(),
            "compute": ComputeResource(),
            # every asset takes it: a run whose config ldm_core refuses fails before its first asset starts
            "run_config_check": RunConfigCheck(),
        },
        # one process per run by default (the assets form a chain, and torch is imported once); deploy/ picks the
        # k8s executor through LDM_EXECUTOR
        executor=executor_from_env(),
    )
