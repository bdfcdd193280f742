"""The GPU assets on 2 processes: vae_model and ldm_model launch torchrun (gloo on CPU) through Dagster Pipes.

The tiny pipeline runs up to ldm_model with ``compute: {config: {num_processes: 2}}``. Rank 0's progress lines and
metadata must come back through Pipes (they are only known inside the torchrun processes), its metrics must land in
the asset's MLflow run, and the assets must carry on as in-process: latent scale, registry, latent store.
"""

import dagster as dg
import pytest
from mlflow.tracking import MlflowClient

from ldm_core import storage
from pipeline import run_configs
from pipeline.definitions import defs
from tests.e2e.helpers import materialized_metadata, upto

ASSETS = upto("ldm_model")


@pytest.fixture(scope="module")
def two_process_run(ldm_home, tiny_config):
    run_config = run_configs.for_assets(tiny_config, set(ASSETS))
    run_config["resources"] = {"compute": {"config": {"num_processes": 2}}}
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def("ldm_training_job").execute_in_process(
            run_config=run_config, instance=instance, asset_selection=[dg.AssetKey(a) for a in ASSETS]
        )
        messages = [e.user_message for e in instance.all_logs(result.run_id)]
    assert result.success
    return result, messages


@pytest.mark.slow
@pytest.mark.parametrize("asset,stage", [("vae_model", "vae"), ("ldm_model", "ldm")])
def test_training_ran_under_torchrun_and_reported_back_through_pipes(two_process_run, asset, stage):
    result, messages = two_process_run
    md = materialized_metadata(result, asset)
    # launched by the asset ...
    assert md["launcher"] == "torchrun" and md["processes"] == 2
    # ... and reported by rank 0 through Pipes: the world it ran in, the steps it took
    assert md["world_size"] == 2 and md["distributed_backend"] == "gloo" and md["trained_steps"] == 6
    assert md["steps"] == 6  # the train result rebuilt from rank 0's report
    # rank 0's log lines reached the Dagster run log while it ran
    assert any(m.startswith(f"{stage}: rank 0 of 2 processes (gloo)") for m in messages)
    assert any(m.startswith(f"{stage}: trained 6 steps on 2 processes") for m in messages)


@pytest.mark.slow
def test_rank_zero_tracked_into_the_assets_mlflow_runs_and_models_were_registered(two_process_run, ldm_home):
    result, _ = two_process_run
    client = MlflowClient()
    for asset, registered, metric in (("vae_model", "ldm-vae", "rec"), ("ldm_model", "ldm", "loss")):
        md = materialized_metadata(result, asset)
        run = client.get_run(md["mlflow_run_id"])
        assert run.data.params["world_size"] == "2" and metric in run.data.metrics
        version = client.get_model_version_by_alias(registered, "candidate")
        assert md[f"{'vae' if registered == 'ldm-vae' else 'ldm'}_version"] == int(version.version)
    vae_md = materialized_metadata(result, "vae_model")
    assert vae_md["latent_scale"] > 0 and storage.exists(vae_md["vae_url"])
    assert materialized_metadata(result, "latent_store")["vae_uri"] == vae_md["vae_uri"]
    # the hand-over copies of the trained models are gone: the assets saved their own
    staging = ldm_home / "storage" / "staging"
    assert (staging / "vae").is_dir() and (staging / "ldm").is_dir()  # rank 0 wrote there ...
    assert not [p for p in staging.rglob("*") if p.is_file()]  # ... and the assets removed what they loaded
