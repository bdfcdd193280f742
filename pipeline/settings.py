"""Where things live by default: everything under LDM_HOME (default ./.ldm).

    LDM_HOME/dagster      the Dagster instance (DAGSTER_HOME), runs, event log, schedules
    LDM_HOME/mlflow.db    the MLflow tracking + registry store (SQLite)
    LDM_HOME/mlartifacts  MLflow artifacts
    LDM_HOME/storage      the default storage root (datasets, models, latents, reports, checkpoints)

Each can be redirected by an environment variable (DAGSTER_HOME, MLFLOW_TRACKING_URI, LDM_MLFLOW_ARTIFACTS,
LDM_STORAGE_ROOT), which is how deploy/ points them at Postgres and S3 without code edits.
"""

from __future__ import annotations

import os
from pathlib import Path


def ldm_home() -> Path:
    return Path(os.environ.get("LDM_HOME", ".ldm")).expanduser().resolve()


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or ldm_home() / "dagster").resolve()


def mlflow_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ldm_home() / 'mlflow.db'}"


def mlflow_artifact_location() -> str:
    return os.environ.get("LDM_MLFLOW_ARTIFACTS") or (ldm_home() / "mlartifacts").as_uri()


def storage_root() -> str:
    return os.environ.get("LDM_STORAGE_ROOT") or str(ldm_home() / "storage")


def mlflow_ui_url() -> str:
    return os.environ.get("LDM_MLFLOW_UI_URL", "http://127.0.0.1:5000")
