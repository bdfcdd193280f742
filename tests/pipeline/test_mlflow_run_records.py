"""What a training run's MLflow record shows it used: the machine (system metrics, sampled while the run is open and
once more at its end) and its inputs (dataset inputs with their versions as digests), through a real Dagster
materialization of a throwaway asset on the real MLflowResource and a SQLite tracking store."""

import time

import dagster as dg
import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.resources import MLflowResource
from pipeline.tracking import SystemMetrics

CPU, MEMORY = "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite tracking store for the module (creating one takes seconds); each test has its own experiment."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


@pytest.fixture(autouse=True)
def _no_mlflow_overrides(monkeypatch):
    # a developer's MLFLOW_SYSTEM_METRICS_* must not change what is tested; MLflowResource.client() sets MLflow's
    # process-wide URIs (and exports them): restored after each test
    for var in ("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING"):
        monkeypatch.delenv(var, raising=False)
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///unused-by-these-tests.db")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(i * i for i in range(1000))


def _materialize(store: str, tmp_path, interval_s: float, work_s: float) -> tuple[MlflowClient, str, dict]:
    """Materialize a throwaway training-like asset; (client on the store, its MLflow run id, what it saw)."""
    data = tmp_path / "dataset"
    data.mkdir()
    seen: dict = {}

    @dg.asset
    def throwaway_training(context: dg.AssetExecutionContext, mlflow: MLflowResource) -> dg.MaterializeResult:
        with mlflow.materialization_run(context, system_metrics=True) as run:
            run.log_dataset(
                name="image_dataset",
                url=str(data),
                digest="0123456789ab",
                context="training",
                tags={"data_version": "v-test"},
            )
            seen["status_after_input"] = run.client.get_run(run.run_id).info.status
            _busy(work_s)
        return dg.MaterializeResult(metadata={"mlflow_run_id": run.run_id})

    resource = MLflowResource(
        tracking_uri=store,
        artifact_location=(tmp_path / "mlartifacts").as_uri(),
        experiment=tmp_path.name,
        system_metrics_interval_s=interval_s,
    )
    started = time.monotonic()
    result = dg.materialize(
        [throwaway_training], resources={"mlflow": resource}, instance=dg.DagsterInstance.ephemeral()
    )
    seen["step_s"] = time.monotonic() - started
    assert result.success
    [mat] = result.asset_materializations_for_node("throwaway_training")
    return MlflowClient(tracking_uri=store), mat.metadata["mlflow_run_id"].value, seen


def test_a_training_run_records_system_metrics_throughout_and_its_dataset_input(store, tmp_path):
    client, run_id, seen = _materialize(store, tmp_path, interval_s=0.2, work_s=1.2)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {CPU, MEMORY, "system/system_memory_usage_percentage"} <= set(run.data.metrics)
    assert run.data.metrics[MEMORY] > 0
    assert not [k for k in run.data.metrics if k.startswith("system/gpu_")]  # no GPU here: none, and no error
    # sampled all along: logging the input left the run RUNNING (MLflow's monitor stops at a run not RUNNING)
    assert seen["status_after_input"] == "RUNNING"
    steps = sorted(m.step for m in client.get_metric_history(run_id, CPU))
    assert steps == list(range(len(steps))) and len(steps) >= 3, steps

    [ds] = run.inputs.dataset_inputs
    assert (ds.dataset.name, ds.dataset.digest) == ("image_dataset", "0123456789ab")
    assert str(tmp_path / "dataset") in ds.dataset.source
    assert {(t.key, t.value) for t in ds.tags} == {("mlflow.data.context", "training"), ("data_version", "v-test")}


def test_a_run_shorter_than_one_interval_still_shows_cpu_and_memory(store, tmp_path):
    client, run_id, seen = _materialize(store, tmp_path, interval_s=600, work_s=0.3)
    assert seen["step_s"] < 60  # the stop does not wait out the interval
    for key in (CPU, MEMORY):
        [sample] = client.get_metric_history(run_id, key)
        assert sample.step == 0
    assert client.get_run(run_id).data.metrics[MEMORY] > 0


def test_system_metrics_go_to_the_given_store_not_mlflows_global_uri(store, tmp_path):
    client = MlflowClient(tracking_uri=store)
    run_id = client.create_run(client.create_experiment(tmp_path.name)).info.run_id
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'decoy.db'}")  # the fixture restores it
    monitor = SystemMetrics(run_id, tracking_uri=store, interval_s=600).start()
    monitor.stop()
    assert CPU in client.get_run(run_id).data.metrics
