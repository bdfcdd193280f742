import os
import warnings

import pytest

# Tests are offline and deterministic: never try to reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

pytest_plugins = ["tests.s3_fixture"]


@pytest.fixture(autouse=True)
def _no_disposed_dagster_instance_left_current():
    """Dagster makes an instance's state storage current while the instance is entered (a context variable that
    loading any Definitions reads). A schedule or sensor context built in a test (`dg.build_sensor_context`) enters an
    instance of its own when asked for one and is never closed, so its storage stays current after the instance is
    gone, and a later test that builds Definitions fails with "Attempted to resolve undefined DagsterInstance weakref"
    (seen after tests/pipeline/test_schedule_sensor.py). Such a storage is cleared before each test, with a warning."""
    from dagster._core.storage.defs_state.base import _current_storage

    storage = _current_storage.get()
    weakref = getattr(storage, "_instance_weakref", None)
    if storage is not None and weakref is not None and weakref() is None:
        warnings.warn("a disposed Dagster instance was left current by an earlier test; cleared", stacklevel=1)
        _current_storage.set(None)
    yield
