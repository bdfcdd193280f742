"""The executor of every job, chosen by the deployment through LDM_EXECUTOR (never by editing code).

in_process    (default) one process per run: the assets form a chain, and torch is imported once
multiprocess  one process per step
k8s           one Kubernetes pod per step (dagster-k8s' k8s_job_executor; deploy/helm/values.yaml sets it), so
              only the GPU assets' pods ask for a GPU (their `dagster-k8s/config` op tags)
"""

from __future__ import annotations

import os

import dagster as dg

EXECUTORS = ("in_process", "multiprocess", "k8s")


def executor_from_env() -> dg.ExecutorDefinition:
    kind = os.environ.get("LDM_EXECUTOR", "in_process")
    if kind == "in_process":
        return dg.in_process_executor
    if kind == "multiprocess":
        return dg.multiprocess_executor
    if kind == "k8s":
        try:  # imported only here: the default path does not need dagster-k8s
            from dagster_k8s import k8s_job_executor
        except ImportError as e:
            raise ImportError(
                "LDM_EXECUTOR=k8s needs dagster-k8s: install the project with its k8s extra "
                "(pip install 'ldm-pipeline[k8s]'; deploy/Dockerfile does)"
            ) from e
        return k8s_job_executor
    raise ValueError(f"LDM_EXECUTOR={kind!r} is not one of {EXECUTORS}")
