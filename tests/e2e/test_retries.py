"""Dagster retries a GPU step that fails, and the retry resumes from the step's checkpoint; a config error fails the
step at once, without retries (the GPU assets' RetryPolicy, pipeline/asset_common.py)."""

import copy

import pytest

from benchmarks.faults.injectors import FailOnceAfterCheckpoint
from pipeline.resources import PARENT_TAG
from tests.e2e.helpers import execute, materialized_metadata, mlflow_runs, step_events, upto


@pytest.mark.slow
def test_a_step_that_fails_mid_training_is_retried_and_resumes_from_its_checkpoint(ldm_home, tiny_config, monkeypatch):
    preempted = FailOnceAfterCheckpoint(step=3).install(monkeypatch)  # vae_model: 6 steps, a checkpoint every 3
    result = execute(tiny_config, ("image_dataset", "vae_model"), raise_on_error=False)
    assert preempted.fired and result.success
    events = step_events(result, "vae_model")
    assert events.count("STEP_UP_FOR_RETRY") == 1 and "STEP_RESTARTED" in events
    md = materialized_metadata(result, "vae_model")
    assert md["resumed_from"] == 3 and md["steps"] == 6

    # in MLflow: the preempted attempt FAILED, the retry FINISHED, and the parent the retry reopened FINISHED
    runs = mlflow_runs(result, order_by=["start_time"])
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
    assert execute(tiny_config, upto("latent_store"), raise_on_error=False).success
    config = copy.deepcopy(tiny_config)
    config["ops"]["ldm_model"]["config"]["training"]["denoiser"]["context_dim"] = 7
    result = execute(config, ("ldm_model",), raise_on_error=False)
    assert not result.success
    events = step_events(result, "ldm_model")
    assert "STEP_UP_FOR_RETRY" not in events and events.count("STEP_FAILURE") == 1
    (failure,) = [e for e in result.all_events if e.step_key == "ldm_model" and e.is_step_failure]
    assert "context_dim=7" in failure.step_failure_data.error.message
