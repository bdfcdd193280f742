"""The example configs of pipeline/configs/pretrained/ run as written, through `dagster job execute`: each loaded from
its file, its placeholder replaced by a tiny model this test builds (a diffusers UNet folder, an SD3 pipeline folder
on S3, the registered champion, a LoRA on it), shrunk to tests/e2e/tiny.yaml's sizes."""

from __future__ import annotations

import copy
from pathlib import Path

import diffusers
import fsspec
import yaml
from mlflow.tracking import MlflowClient

from ldm_core.bundle import load_text_to_image
from ldm_core.checkpoint import CheckpointManager
from ldm_core.init_weights import from_diffusers_folder
from ldm_core.lora import adapter_state_dict, has_lora, lora_config
from ldm_core.model_io import read_model_meta, state_dict_sha256
from pipeline import run_configs
from pipeline.defs.jobs import RETRAIN_ASSETS
from pipeline.mlflow_models import download_text_to_image
from tests.core.tiny_models import tiny_diffusers_unet
from tests.e2e.helpers import PRETRAINED_EXAMPLES, dagster_job_execute, latest_metadata, merged

PLACEHOLDERS = {
    "unet": "/path/to/diffusers/unet",
    "sd3-transformer": "/path/to/diffusers/pipeline",
    "champion": "models:/ldm@champion",
    "lora": "models:/ldm@champion",
}


def shrunk(name: str, tiny: dict, init_from: str) -> dict:
    """The example config with its placeholder replaced and tiny.yaml's sizes merged in; the denoiser stays the
    source's (tiny's denoiser section is left out)."""
    config = yaml.safe_load((PRETRAINED_EXAMPLES / f"{name}.yaml").read_text())
    ldm = config["ops"]["ldm_model"]["config"]
    assert ldm["init_from"] == PLACEHOLDERS[name] and "denoiser" not in ldm["training"]
    ldm["init_from"] = init_from

    small = copy.deepcopy(tiny)
    del small["ops"]["ldm_model"]["config"]["training"]["denoiser"]
    return merged(config, {"ops": {k: v for k, v in small["ops"].items() if k in config["ops"]}})


def execute(job: str, config: dict, home: Path) -> dict:
    """`dagster job execute` of the config; the ldm_model materialization's metadata."""
    out = dagster_job_execute(home, config, job=job)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return latest_metadata("ldm_model")


def test_unet_folder_config(ldm_home, tiny_config, tmp_path):
    folder = tmp_path / "unet"
    # the tiny store's shapes: 4 latent channels (tiny autoencoder), 8x8 latents, MiniLM's 384-wide tokens
    tiny_diffusers_unet(cross_attention_dim=384).save_pretrained(folder)
    md = execute("ldm_training_job", shrunk("unet", tiny_config, str(folder)), ldm_home)
    assert md["warm_start"] is True and md["init_from"] == str(folder)
    assert md["init_source_hash"] == from_diffusers_folder(str(folder)).sha256
    assert md["backbone"].startswith("unet (model_channels 16, channel_mult [1, 2]")


def test_sd3_pipeline_folder_on_s3_config(ldm_home, tiny_config, tmp_path, s3_url):
    pipe = tmp_path / "pipe"
    diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=384,
        caption_projection_dim=16,
        pooled_projection_dim=384,
        pos_embed_max_size=8,
    ).save_pretrained(pipe / "transformer")
    (pipe / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    fs, root = fsspec.core.url_to_fs(s3_url)
    fs.put(str(pipe) + "/", root + "/pipe", recursive=True)
    # the autoencoder and store of the run before: ldm_retrain_job runs the file's other sections
    config = run_configs.for_assets(shrunk("sd3-transformer", tiny_config, f"{s3_url}/pipe"), RETRAIN_ASSETS)
    md = execute("ldm_retrain_job", config, ldm_home)
    assert md["warm_start"] is True and md["init_from"] == f"{s3_url}/pipe/transformer"
    assert md["init_source_hash"] == from_diffusers_folder(str(pipe), subfolder="transformer").sha256
    assert md["backbone"].startswith("mmdit (hidden_size 16, depth 2")


def test_champion_config(ldm_home, tiny_config, tmp_path):
    client = MlflowClient()
    # the example gate's thresholds are out of a tiny run's reach: promote the last candidate by hand
    candidate = client.get_model_version_by_alias("ldm", "candidate").version
    client.set_registered_model_alias("ldm", "champion", candidate)
    md = execute("ldm_retrain_job", shrunk("champion", tiny_config, "models:/ldm@champion"), ldm_home)
    weights = download_text_to_image(f"models:/ldm/{candidate}", str(tmp_path / "c")).denoiser.state_dict()
    assert md["warm_start"] is True and md["init_from"] == f"models:/ldm/{candidate}"
    assert md["init_source_hash"] == state_dict_sha256(weights)


def test_lora_config(ldm_home, tiny_config, tmp_path):
    """A LoRA on the champion: the denoiser trains an adapter only, checkpoints it without the base, and registers the
    base plus the adapter, which records the champion as its base and generates."""
    client = MlflowClient()
    champion = client.get_model_version_by_alias("ldm", "champion").version
    config = shrunk("lora", tiny_config, "models:/ldm@champion")
    assert config["ops"]["ldm_model"]["config"]["training"]["lora"] == {"rank": 8, "alpha": 8, "dropout": 0.0}
    md = execute("ldm_retrain_job", config, ldm_home)
    assert md["warm_start"] is True and md["init_from"] == f"models:/ldm/{champion}"
    version = client.get_model_version("ldm", str(md["ldm_version"]))
    url = version.tags["storage_url"]
    model = load_text_to_image(url)
    assert has_lora(model.denoiser) and lora_config(model.denoiser).rank == 8
    base = read_model_meta(f"{url}/denoiser/lora")["base"]
    assert base == {"sha256": read_model_meta(f"{url}/denoiser")["weights_sha256"], "source": f"models:/ldm/{champion}"}
    # the base is the champion's weights, bit for bit: LoRA never moved them
    champion_weights = download_text_to_image(f"models:/ldm/{champion}", str(tmp_path / "c")).denoiser.state_dict()
    assert base["sha256"] == state_dict_sha256(champion_weights) == md["init_source_hash"]
    assert model.generate(["a large red circle in the center"], steps=2).shape == (1, 32, 32, 3)
    # only the adapter trained: the run's parameter count is the adapter's, and the checkpoint holds nothing else
    params = client.get_run(version.run_id).data.params
    n_adapter = sum(v.numel() for v in adapter_state_dict(model.denoiser).values())
    assert params["lora.rank"] == "8" and params["denoiser_parameters"] == str(n_adapter)
    ckpt_dir = ldm_home / "storage" / "checkpoints" / "ldm"
    newest = max(ckpt_dir.iterdir(), key=lambda p: p.stat().st_mtime)
    _, state = CheckpointManager(str(newest)).load_latest()
    assert state["model"] and all(".lora_" in k for k in state["model"])
    assert state["base"]["sha256"] == base["sha256"]
