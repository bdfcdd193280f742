"""Dagster retries a GPU step that fails, and the retry resumes from the step's checkpoint; a config error fails the
step at once, without retries (the GPU assets' RetryPolicy, pipeline/assets/common.py)."""

import copy

import dagster as dg
import pytest
from mlflow.tracking import MlflowClient

from benchmarks.faults.injectors import FailOnceAfterCheckpoint
from pipeline.definitions import defs
from pipeline.resources import PARENT_TAG


def _run(config: dict, assets: tuple[str, ...]) -> dg.ExecuteInProcessResult:
    job = defs.resolve_job_def("ldm_training_job").get_subset(asset_selection={dg.AssetKey(a) for a in assets})
    with dg.DagsterInstance.get() as instance:
        return job.execute_in_process(
            run_config={"ops": {a: config["ops"][a] for a in assets}}, instance=instance, raise_on_error=False
        )


def _step_events(result: dg.ExecuteInProcessResult, step: str) -> list[str]:
    return [e.event_type_value for e in result.all_events if e.step_key == step]


@pytest.mark.slow
def test_a_step_that_fails_mid_training_is_retried_and_resumes_from_its_checkpoint(ldm_home, tiny_config, monkeypatch):
    preempted = FailOnceAfterCheckpoint(step=3).install(monkeypatch)  # vae_model: 6 steps, a checkpoint every 3
    result = _run(tiny_config, ("image_dataset", "vae_model"))
    assert preempted.fired and result.success
    events = _step_events(result, "vae_model")
    assert events.count("STEP_UP_FOR_RETRY") == 1 and "STEP_RESTARTED" in events
    md = {k: v.value for k, v in result.asset_materializations_for_node("vae_model")[0].metadata.items()}
    assert md["resumed_from"] == 3 and md["steps"] == 6

    # in MLflow: the preempted attempt FAILED, the retry FINISHED, and the parent the retry reopened FINISHED
    client = MlflowClient()
    runs = client.search_runs(
        [client.get_experiment_by_name("ldm-pipeline").experiment_id],
        filter_string=f"tags.`dagster.run_id` = '{result.run_id}'",
        order_by=["start_time"],
    )
    statuses = [(r.data.tags.get("dagster.asset_key") or r.data.tags[PARENT_TAG], r.info.status) for r in runs]
    assert statuses == [
        ("true", "FINISHED"),
        ("image_dataset", "FINISHED"),
        ("vae_model", "FAILED"),
        ("vae_model", "FINISHED"),
    ]


@pytest.mark.slow
def test_a_config_error_found_in_a_gpu_step_is_not_retried(ldm_home, tiny_config):
    """ldm_model materialized alone with a denoiser whose context width the stored latents cannot feed: only the
    asset can tell (the run config has no latent_store section to check it against), and no retry would help."""
    assert _run(tiny_config, ("image_dataset", "vae_model", "latent_store")).success
    config = copy.deepcopy(tiny_config)
    config["ops"]["ldm_model"]["config"]["training"]["denoiser"]["context_dim"] = 7
    result = _run(config, ("ldm_model",))
    assert not result.success
    events = _step_events(result, "ldm_model")
    assert "STEP_UP_FOR_RETRY" not in events and events.count("STEP_FAILURE") == 1
    (failure,) = [e for e in result.all_events if e.step_key == "ldm_model" and e.is_step_failure]
    assert "context_dim=7" in failure.step_failure_data.error.message
