"""Warm-started retraining for real: a champion registered by the tiny pipeline, new images at a local source, the
new-data sensor's retrain run starting from the champion's weights; the weekly schedule's run (which retrains the
autoencoder) from scratch, saying why; a diffusers folder that does not fit the store refused before training."""

from __future__ import annotations

import copy
import datetime

import dagster as dg
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from ldm_core.bundle import load_denoiser
from ldm_core.data.synthetic import write_shapes_source
from ldm_core.model_io import state_dict_sha256
from pipeline.definitions import defs
from pipeline.mlflow_models import download_text_to_image
from tests.core.tiny_models import tiny_diffusers_unet
from tests.e2e.helpers import execute, latest_metadata

# the retrain's steps barely move the weights: its registered (EMA) denoiser is then its starting weights to within
# lr x steps, which tells a start from the champion apart from a random one without reading any internal state
RETRAIN_LR = 1e-9


def _run_request_config(config: dict, tmp_path, monkeypatch) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("LDM_RUN_CONFIG", str(path))


@pytest.fixture(scope="module")
def champion(ldm_home, tiny_config, tmp_path_factory):
    """The tiny pipeline on a local image folder: its model is registered and becomes the champion."""
    source = tmp_path_factory.mktemp("source")
    write_shapes_source(str(source), 48, seed=1)
    config = copy.deepcopy(tiny_config)
    config["ops"]["image_dataset"]["config"]["source"] = str(source)
    # no EMA (0): the raw weights, not an average that after 6 steps is still the seeded initialisation
    config["ops"]["ldm_model"]["config"]["training"]["trainer"]["ema_decay"] = 0.0
    result = execute(config)
    assert result.success
    version = MlflowClient().get_model_version_by_alias("ldm", "champion").version
    return {"config": config, "source": source, "uri": f"models:/ldm/{version}"}


def test_the_sensors_retrain_starts_from_the_champions_weights(champion, ldm_home, tmp_path, monkeypatch):
    config = copy.deepcopy(champion["config"])
    # another seed: a start from scratch would be another random network altogether
    config["ops"]["ldm_model"]["config"]["training"]["trainer"].update(lr=RETRAIN_LR, seed=1)
    _run_request_config(config, tmp_path, monkeypatch)
    sensor = defs.resolve_sensor_def("ldm_new_data_sensor")
    with dg.DagsterInstance.get() as instance:
        baseline = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
        write_shapes_source(str(champion["source"]), 64, seed=1)  # the same 48 images and 16 new ones
        request = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=baseline.cursor)).run_requests[
            0
        ]
        result = defs.resolve_job_def("ldm_retrain_job").execute_in_process(
            run_config=request.run_config, instance=instance, tags=request.tags
        )
        assert result.success
        md = latest_metadata("ldm_model", instance)

    with torch.no_grad():
        champion_weights = download_text_to_image(champion["uri"], str(tmp_path / "c")).denoiser.state_dict()
    assert md["warm_start"] is True and md["init_from"] == champion["uri"]
    assert md["init_source_hash"] == state_dict_sha256(champion_weights)
    assert "warm start from the champion" in md["warm_start_reason"]
    retrained = load_denoiser(md["ldm_url"] + "/denoiser").state_dict()
    for name, tensor in champion_weights.items():
        torch.testing.assert_close(retrained[name], tensor, atol=1e-5, rtol=0)
    params = MlflowClient().get_run(md["mlflow_run_id"]).data.params
    assert params["warm_start"] == "True" and params["init_source_hash"] == md["init_source_hash"]
    assert MlflowClient().get_model_version("ldm", str(md["ldm_version"])).tags["init_from"] == champion["uri"]


def test_a_folder_that_does_not_fit_the_store_is_refused_before_training(champion, ldm_home, tmp_path):
    folder = tmp_path / "unet768"
    tiny_diffusers_unet(cross_attention_dim=768).save_pretrained(folder)
    config = copy.deepcopy(champion["config"])
    del config["ops"]["vae_model"]
    ldm = config["ops"]["ldm_model"]["config"]
    ldm["init_from"] = str(folder)
    del ldm["training"]["denoiser"]
    result = execute(config, job="ldm_retrain_job", raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert failure.step_key == "ldm_model"
    assert failure.step_failure_data.error.message.strip().endswith(
        "init_from has context_dim 768; the store's text encoder gives 384"
    )
    assert failure.step_failure_data.user_failure_data.description == (
        "init_from has context_dim 768; the store's text encoder gives 384"
    )
    # refused at once, not retried: the same folder would be refused again
    assert not [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]


def test_the_weekly_retrain_with_a_new_autoencoder_trains_from_scratch_and_says_why(
    champion, ldm_home, tmp_path, monkeypatch
):
    _run_request_config(champion["config"], tmp_path, monkeypatch)
    schedule = defs.resolve_schedule_def("ldm_weekly_retrain")
    client = MlflowClient()
    champion_now = client.get_model_version_by_alias("ldm", "champion")
    with dg.DagsterInstance.get() as instance:
        tick = dg.build_schedule_context(instance=instance, scheduled_execution_time=datetime.datetime(2026, 12, 6, 3))
        request = schedule.evaluate_tick(tick).run_requests[0]
        assert request.run_config["ops"]["ldm_model"]["config"]["init_from"] == "auto"
        result = defs.resolve_job_def("ldm_training_job").execute_in_process(
            run_config=request.run_config, instance=instance, tags=request.tags
        )
        assert result.success
        md = latest_metadata("ldm_model", instance)
    assert md["warm_start"] is False and md["init_from"] == "none" and md["init_source_hash"] == ""
    assert md["warm_start_reason"] == (
        f"from scratch: the champion models:/ldm/{champion_now.version} was trained on latents of "
        f"{champion_now.tags['vae_uri']}; the latent store was encoded with {md['vae_uri']}"
    )
    assert md["vae_uri"] != champion_now.tags["vae_uri"]
    assert client.get_run(md["mlflow_run_id"]).data.params["warm_start"] == "False"
