"""What a training run's MLflow record shows it used: the machine (system metrics, sampled while the run is open and
once more at its end) and its inputs (dataset inputs with their versions as digests), through a real Dagster
materialization of a throwaway asset on the real MLflowResource and a SQLite tracking store."""

import threading
import time

import dagster as dg
import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.resources import MLflowResource, TrackedRun
from pipeline.tracking import SystemMetrics

CPU, MEMORY = "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite tracking store for the module (creating one takes seconds); each test has its own experiment."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


@pytest.fixture(autouse=True)
def _no_mlflow_overrides(monkeypatch, tmp_path):
    # a developer's MLFLOW_SYSTEM_METRICS_* must not change what is tested; MLflowResource.client() sets MLflow's
    # process-wide URIs (and exports them): restored after each test
    for var in ("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING"):
        monkeypatch.delenv(var, raising=False)
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'global-unused.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def _sampling_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]


def _nvml_gpus() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except Exception:
        return 0


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(i * i for i in range(1000))


def _sampled_after(client: MlflowClient, run_id: str, after_ms: float, samples: int, timeout_s: float) -> None:
    """Work until the monitor has logged ``samples`` CPU samples after ``after_ms`` (a busy machine schedules its
    thread late: waiting for the samples, not for a fixed time, keeps the test about the monitor)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _busy(0.1)
        if len([m for m in client.get_metric_history(run_id, CPU) if m.timestamp > after_ms]) >= samples:
            return


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


def _materialize(
    store: str, tmp_path, interval_s: float, work_s: float, register: bool = False, fail: bool = False
) -> tuple[MlflowClient, str, dict]:
    """Materialize a throwaway training-like asset (``register``: which also logs and registers a model, as the
    training assets do; ``fail``: which then raises); (client on the store, its MLflow run id, what it saw)."""
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
            if register:
                run.log_and_register_pyfunc(
                    name="model",
                    registered_name=f"echo-{tmp_path.name}",
                    python_model=_Echo(),
                    artifacts={},
                    signature=None,
                    alias=None,
                    code_paths=[],
                    pip_requirements=["mlflow"],
                )
                seen["status_after_model"] = run.client.get_run(run.run_id).info.status
                seen["model_logged_ms"] = time.time() * 1000
                _sampled_after(run.client, run.run_id, seen["model_logged_ms"], samples=2, timeout_s=60)
            seen["run_id"] = run.run_id
            if fail:
                raise RuntimeError("training diverged")
        return dg.MaterializeResult(metadata={"mlflow_run_id": run.run_id})

    resource = MLflowResource(
        tracking_uri=store,
        artifact_location=(tmp_path / "mlartifacts").as_uri(),
        experiment=tmp_path.name,
        system_metrics_interval_s=interval_s,
    )
    started = time.monotonic()
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [throwaway_training], resources={"mlflow": resource}, instance=instance, raise_on_error=False
        )
    seen["step_s"] = time.monotonic() - started
    assert result.success is not fail
    return MlflowClient(tracking_uri=store), seen["run_id"], seen


def test_a_training_run_records_system_metrics_throughout_and_its_dataset_input(store, tmp_path):
    client, run_id, seen = _materialize(store, tmp_path, interval_s=0.2, work_s=0.8, register=True)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {CPU, MEMORY, "system/system_memory_usage_percentage"} <= set(run.data.metrics)
    assert run.data.metrics[MEMORY] > 0
    if _nvml_gpus():  # without one (an NVML error inside MLflow's monitor), the run has none and the rest as above
        assert {"system/gpu_0_utilization_percentage", "system/gpu_0_memory_usage_megabytes"} <= set(run.data.metrics)
    # sampled all along: logging the input left the run RUNNING (MLflow's monitor stops at a run not RUNNING)
    assert seen["status_after_input"] == "RUNNING"
    # and so did logging the model (MLflow's fluent start_run ends a run it leaves)
    assert seen["status_after_model"] == "RUNNING"
    history = client.get_metric_history(run_id, CPU)
    steps = sorted(m.step for m in history)
    assert steps == list(range(len(steps))), steps
    # sampled on after the model (two samples, waited for), and once more at the end
    assert len([m for m in history if m.timestamp > seen["model_logged_ms"]]) >= 3, (history, seen)

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
    assert not _sampling_threads()


def test_a_failed_run_stops_sampling_and_keeps_its_last_sample(store, tmp_path):
    client, run_id, _ = _materialize(store, tmp_path, interval_s=600, work_s=0.3, fail=True)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert {CPU, MEMORY} <= set(run.data.metrics)
    assert not _sampling_threads()


def test_system_metrics_go_to_the_given_store_not_mlflows_global_uri(store, tmp_path):
    client = MlflowClient(tracking_uri=store)
    run_id = client.create_run(client.create_experiment(tmp_path.name)).info.run_id
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'decoy.db'}")  # the fixture restores it
    monitor = SystemMetrics(run_id, tracking_uri=store, interval_s=600).start()
    monitor.stop()
    assert CPU in client.get_run(run_id).data.metrics


def test_a_digest_longer_than_mlflow_keeps_is_refused_before_the_store(store, tmp_path):
    # SQLite would keep it; Postgres (the deployment's store) fails the whole call on its VARCHAR(36)
    client = MlflowClient(tracking_uri=store)
    exp_id = client.create_experiment(tmp_path.name)
    run = TrackedRun(MLflowResource(tracking_uri=store), client, exp_id, client.create_run(exp_id).info.run_id)
    with pytest.raises(ValueError, match="1 to 36 characters"):
        run.log_dataset(
            name="latent_store", url=str(tmp_path), digest="s3://bucket/latents/vae-v3-0123456789ab", context="training"
        )
    assert not client.get_run(run.run_id).inputs.dataset_inputs
