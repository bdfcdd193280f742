"""Wiring only: assets, checks, jobs, schedule, sensor and resources. Loaded by workspace.yaml."""

import dagster as dg

from pipeline.assets.evaluation_report import evaluation_report
from pipeline.assets.image_dataset import image_dataset
from pipeline.assets.latent_store import latent_store
from pipeline.assets.ldm_model import ldm_model
from pipeline.assets.vae_model import vae_model
from pipeline.checks import ALL_CHECKS
from pipeline.executors import executor_from_env
from pipeline.jobs import ldm_new_data_sensor, ldm_retrain_job, ldm_training_job, ldm_weekly_retrain
from pipeline.mlflow_runs import MLFLOW_RUN_SENSORS
from pipeline.resources import ComputeResource, MLflowResource, StorageResource
from pipeline.validation import RunConfigCheck

ASSETS = [image_dataset, vae_model, latent_store, ldm_model, evaluation_report]

defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=[ldm_training_job, ldm_retrain_job],
    schedules=[ldm_weekly_retrain],
    sensors=[ldm_new_data_sensor, *MLFLOW_RUN_SENSORS],
    resources={
        "mlflow": MLflowResource(),
        "storage": StorageResource(),
        "compute": ComputeResource(),
        # every asset takes it: a run whose config ldm_core refuses fails before its first asset starts
        "run_config_check": RunConfigCheck(),
    },
    # one process per run by default (the assets form a chain, and torch is imported once); deploy/ picks the k8s
    # executor through LDM_EXECUTOR
    executor=executor_from_env(),
)


def get_training_job() -> dg.JobDefinition:
    """For `dg.reconstructable` (ldm demo, tests): the resolved ldm_training_job."""
    return defs.resolve_job_def(ldm_training_job.name)
