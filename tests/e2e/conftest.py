import mlflow
import pytest

from benchmarks.faults.dagster_trial import fresh_home
from tests.common import load_tiny_config


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return load_tiny_config()


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
    fresh_home(home)
    yield home
    mp.undo()
