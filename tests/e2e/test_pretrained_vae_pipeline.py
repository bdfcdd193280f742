"""A pretrained diffusers AutoencoderKL as stage 1 through `dagster job execute`, from the example configs in
pipeline/configs/pretrained/ (their placeholder source replaced by a tiny autoencoder built here, their sizes shrunk to
tests/e2e/tiny.yaml's): frozen 4-channel from a local pipeline folder (the whole job), frozen 16-channel from S3,
the decoder fine-tuned with the encoder bitwise kept (4-channel local, 16-channel from S3); registry tags, metadata,
one latent store per autoencoder, reuse keyed on the weights' hash, and the blocking checks as for a trained
autoencoder.

The tests share one Dagster instance and MLflow store and run in order.
"""

import copy
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from ldm_core.bundle import load_autoencoder
from ldm_core.interop.pretrained_vae import load_pretrained_autoencoder
from tests.e2e.helpers import (
    PRETRAINED_EXAMPLES,
    check_results,
    dagster_job_execute,
    execute,
    latest_metadata,
    materialized_assets,
    merged,
    upto,
)
from tests.tiny_autoencoders import save_tiny_autoencoder_kl, upload_folder

pytestmark = pytest.mark.slow

UPTO_STORE = upto("latent_store")
ENCODER_SIDE = ("encoder.", "quant_conv.")


def _example(name: str, source: str, tiny_config: dict) -> dict:
    """The example config as shipped, with the tiny sizes over it and its placeholder source replaced."""
    tiny = copy.deepcopy(tiny_config)
    del tiny["ops"]["vae_model"]["config"]["training"]["model"]  # the architecture comes from the source
    cfg = merged(yaml.safe_load((PRETRAINED_EXAMPLES / name).read_text()), tiny)
    assert cfg["ops"]["vae_model"]["config"]["pretrained"]["source"] != source  # a placeholder was there
    cfg["ops"]["vae_model"]["config"]["pretrained"]["source"] = source
    return cfg


def _ok(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0 and "RUN_SUCCESS" in out.stdout + out.stderr, out.stdout[-3000:] + out.stderr[-3000:]


def _registered(md: dict) -> tuple[dict, dict]:
    """(tags of the registered ldm-vae version, params of its MLflow run)."""
    client = mlflow.MlflowClient()
    version = client.get_model_version("ldm-vae", str(md["vae_version"]))
    return version.tags, client.get_run(md["mlflow_run_id"]).data.params


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained")
    return {
        "c4": save_tiny_autoencoder_kl(root / "sd" / "vae", 4, seed=1, scaling_factor=0.3).parent,
        "c16": save_tiny_autoencoder_kl(root / "sd3" / "vae", 16, seed=2, scaling_factor=0.7, shift_factor=0.1),
        "decoder": save_tiny_autoencoder_kl(root / "ft", 4, seed=3, scaling_factor=0.4),
    }


@pytest.fixture(scope="module")
def stores() -> dict[str, str]:
    return {}


def test_frozen_4_channel_example_runs_the_whole_pipeline(ldm_home, tiny_config, sources, stores):
    _ok(dagster_job_execute(ldm_home, _example("sd-vae-frozen.yaml", str(sources["c4"]), tiny_config)))
    md = latest_metadata("vae_model")
    expected = load_pretrained_autoencoder(str(sources["c4"]), "vae").weights_sha256
    assert md["pretrained_mode"] == "frozen" and md["steps"] == 0 and md["latent_scale_source"] == "config"
    assert md["latent_scale"] == pytest.approx(0.3) and md["latent_shape"] == [4, 8, 8]
    assert md["pretrained_sha256"] == md["weights_sha256"] == expected  # registered as converted, untouched
    tags, params = _registered(md)
    assert tags["pretrained_source"] == f"{sources['c4']} (subfolder vae)" and tags["pretrained_sha256"] == expected
    assert tags["pretrained_mode"] == "frozen" and tags["latent_scale_source"] == "config"
    assert params["latent_scale_source"] == "config" and params["pretrained_sha256"] == expected
    assert latest_metadata("evaluation_report")  # the whole job ran on it
    stores["c4"] = latest_metadata("latent_store")["store_url"]


def test_the_same_weights_are_reused_and_other_weights_at_the_same_path_are_not(ldm_home, tiny_config, sources):
    cfg = _example("sd-vae-frozen.yaml", str(sources["c4"]), tiny_config)
    before = latest_metadata("vae_model")
    assert execute(cfg, ("vae_model",), raise_on_error=False).success
    again = latest_metadata("vae_model")
    assert again["reused"] is True and again["vae_version"] == before["vae_version"]

    save_tiny_autoencoder_kl(sources["c4"] / "vae", 4, seed=9, scaling_factor=0.3)  # overwritten in place
    assert execute(cfg, ("vae_model",), raise_on_error=False).success
    other = latest_metadata("vae_model")
    assert other["reused"] is False and other["vae_version"] != before["vae_version"]
    assert other["pretrained_sha256"] != before["pretrained_sha256"]


def test_frozen_16_channel_example_from_s3_measures_its_latent_scale(ldm_home, tiny_config, sources, stores, s3_url):
    source = upload_folder(sources["c16"], f"{s3_url}/sd3/vae").rsplit("/vae", 1)[0]
    _ok(dagster_job_execute(ldm_home, _example("c16-vae-frozen-s3.yaml", source, tiny_config), UPTO_STORE))
    md = latest_metadata("vae_model")
    assert md["latent_shape"] == [16, 8, 8] and md["latent_scale_source"] == "measured"
    assert md["latent_scale"] != pytest.approx(0.7)  # measured on the data, not the config's
    tags, params = _registered(md)
    assert tags["pretrained_source"] == f"{source} (subfolder vae)" and tags["latent_scale_source"] == "measured"
    assert tags["pretrained_sha256"] == load_pretrained_autoencoder(str(sources["c16"])).weights_sha256
    store = latest_metadata("latent_store")
    assert store["latent_shape"] == [16, 8, 8] and store["vae_uri"] == md["vae_uri"]
    stores["c16"] = store["store_url"]
    assert stores["c16"] != stores["c4"]


def test_decoder_example_fine_tunes_the_decoder_and_keeps_the_encoder_bitwise(ldm_home, tiny_config, sources, stores):
    _ok(
        dagster_job_execute(ldm_home, _example("sd-vae-decoder.yaml", str(sources["decoder"]), tiny_config), UPTO_STORE)
    )
    md = latest_metadata("vae_model")
    assert md["pretrained_mode"] == "decoder" and md["steps"] == 6 and md["latent_scale"] == pytest.approx(0.4)
    start = load_pretrained_autoencoder(str(sources["decoder"]))
    assert md["pretrained_sha256"] == start.weights_sha256 != md["weights_sha256"]
    tuned, source = load_autoencoder(md["vae_url"]).state_dict(), start.model.state_dict()
    for k, v in tuned.items():
        if k.startswith(ENCODER_SIDE):
            assert torch.equal(v, source[k]), f"{k} changed"
    assert not torch.equal(tuned["decoder.conv_out.weight"], source["decoder.conv_out.weight"])
    tags, params = _registered(md)
    assert tags["pretrained_mode"] == "decoder" and params["trainer.trainable"] == "decoder"
    stores["decoder"] = latest_metadata("latent_store")["store_url"]
    assert len(set(stores.values())) == 3  # one latent store per autoencoder


def test_decoder_mode_on_a_16_channel_autoencoder_from_s3(ldm_home, tiny_config, sources, s3_url):
    """The decoder example with the 16-channel source on S3: 16-channel latents, the encoder side kept bit for bit."""
    source = upload_folder(sources["c16"], f"{s3_url}/sd3-ft/vae")
    _ok(dagster_job_execute(ldm_home, _example("sd-vae-decoder.yaml", source, tiny_config), UPTO_STORE))
    md = latest_metadata("vae_model")
    assert md["pretrained_mode"] == "decoder" and md["latent_shape"][0] == 16
    start = load_pretrained_autoencoder(str(sources["c16"]))
    assert md["pretrained_sha256"] == start.weights_sha256 != md["weights_sha256"]
    tuned, kept = load_autoencoder(md["vae_url"]).state_dict(), start.model.state_dict()
    assert all(torch.equal(v, kept[k]) for k, v in tuned.items() if k.startswith(ENCODER_SIDE))
    assert not torch.equal(tuned["decoder.conv_out.weight"], kept["decoder.conv_out.weight"])
    assert latest_metadata("latent_store")["latent_shape"][0] == 16


def test_a_psnr_floor_the_pretrained_autoencoder_misses_blocks_the_latent_store(ldm_home, tiny_config, sources):
    cfg = _example("sd-vae-frozen.yaml", str(sources["c4"]), tiny_config)
    cfg["ops"]["vae_model"]["config"]["psnr_floor"] = 99.0
    before = latest_metadata("latent_store")["store_url"]
    result = execute(cfg, UPTO_STORE, raise_on_error=False)
    assert check_results(result)["vae_reconstruction_psnr"] is False and not result.success
    materialized = materialized_assets(result)
    assert "vae_model" in materialized and "latent_store" not in materialized
    assert latest_metadata("latent_store")["store_url"] == before
