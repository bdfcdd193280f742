import os
from pathlib import Path

import mlflow
import pytest
import yaml

TINY = Path(__file__).with_name("tiny.yaml")


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return yaml.safe_load(TINY.read_text())


@pytest.fixture(scope="module")
def ldm_home(tmp_path_factory):
    """A fresh LDM_HOME (Dagster instance dir, MLflow SQLite, storage) per test module."""
    home = tmp_path_factory.mktemp("ldm_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("LDM_HOME", str(home))
    mp.setenv("DAGSTER_HOME", str(home / "dagster"))
    uri = f"sqlite:///{home / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for var in ("LDM_STORAGE_ROOT", "LDM_MLFLOW_ARTIFACTS", "LDM_RUN_CONFIG", "MLFLOW_REGISTRY_URI"):
        mp.delenv(var, raising=False)
    # an earlier module's MLflowResource set MLflow's process-wide URIs (a server it has stopped since): a plain
    # MlflowClient() here must reach this module's store
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    (home / "dagster").mkdir()
    (home / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    yield home
    mp.undo()


def child_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    # mlflow.set_registry_uri (called in this process by MLflowResource) exports MLFLOW_REGISTRY_URI: a child with
    # its own tracking store must not inherit the registry of this one
    env.pop("MLFLOW_REGISTRY_URI", None)
    env.update(
        {
            "LDM_HOME": str(home),
            "DAGSTER_HOME": str(home / "dagster"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
            "HF_HUB_OFFLINE": "1",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
    )
    return env
