"""Definitions load, carry the contract's names, and every shipped run config validates."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from pipeline import run_configs
from pipeline.config_bridge import ConfigValidationError
from pipeline.definitions import defs
from pipeline.validation import validate_run_config
from tests.common import ROOT

# the names users rely on (a new asset adds to them: only these must stay)
ASSET_KEYS = {"image_dataset", "vae_model", "latent_store", "ldm_model", "evaluation_report"}
DEFS_DIR = ROOT / "pipeline" / "defs"
ASSET_FOLDERS = {p.name for p in DEFS_DIR.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
GPU_ASSETS = {"vae_model", "latent_store", "ldm_model", "evaluation_report"}
JOB = defs.resolve_job_def("ldm_training_job")


def test_assets_jobs_schedule_sensor_names():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys >= ASSET_KEYS and keys == ASSET_FOLDERS
    for key in keys:
        assert graph.get(dg.AssetKey(key)).group_name == "ldm"
    assert set(defs.resolve_job_def("ldm_training_job").asset_layer.executable_asset_keys) == {
        dg.AssetKey(k) for k in keys
    }
    assert defs.resolve_schedule_def("ldm_weekly_retrain").cron_schedule == "0 3 * * 0"
    assert defs.resolve_sensor_def("ldm_new_data_sensor").job_name == "ldm_retrain_job"
    # the MLflow runs of a Dagster run end when it does: hooks on the jobs, sensors (on by default) for the rest
    for name in ("mlflow_runs_end_on_success", "mlflow_runs_end_on_failure", "mlflow_runs_end_on_cancel"):
        assert defs.resolve_sensor_def(name).default_status == dg.DefaultSensorStatus.RUNNING
    for job in ("ldm_training_job", "ldm_retrain_job"):
        assert {h.name for h in defs.resolve_job_def(job).hook_defs} == {
            "mlflow_parent_run_finished",
            "mlflow_parent_run_failed",
        }


def test_dependencies_are_explicit():
    graph = defs.resolve_asset_graph()
    parents = {k: {p.to_user_string() for p in graph.get(dg.AssetKey(k)).parent_keys} for k in ASSET_KEYS}
    assert parents == {
        "image_dataset": set(),
        "vae_model": {"image_dataset"},
        "latent_store": {"image_dataset", "vae_model"},
        "ldm_model": {"latent_store"},
        "evaluation_report": {"image_dataset", "vae_model", "ldm_model"},
    }


def test_every_asset_takes_the_run_config_check():
    """The resource that refuses a bad run config before any work starts; an asset without it would run first."""
    for key in ASSET_FOLDERS:
        assert "run_config_check" in defs.resolve_assets_def(key).required_resource_keys, key


def test_each_asset_lives_in_its_folder():
    """One folder per asset under pipeline/defs: its definition, config, record and validation there, and every
    asset check in the folder of the asset it checks."""
    assert ASSET_FOLDERS >= ASSET_KEYS
    for key in ASSET_FOLDERS:
        assert {"asset.py", "config.py", "record.py", "validation.py"} <= {p.name for p in (DEFS_DIR / key).iterdir()}
        assert defs.resolve_assets_def(key).op.compute_fn.decorated_fn.__module__ == f"pipeline.defs.{key}.asset"
    graph = defs.resolve_asset_graph()
    for check_key in graph.asset_check_keys:
        node = graph._assets_defs_by_check_key[check_key].node_def
        module = node.compute_fn.decorated_fn.__module__
        folder = check_key.asset_key.to_user_string()
        assert module in (f"pipeline.defs.{folder}.checks", f"pipeline.defs.{folder}.asset"), (check_key, module)


def test_the_promotion_gate_is_a_warn_check_of_the_report():
    specs = {spec.name: spec for spec in defs.resolve_assets_def("evaluation_report").check_specs}
    assert "promotion_gate" in specs and not specs["promotion_gate"].blocking


def test_gpu_work_is_tagged():
    for key in GPU_ASSETS:
        node = defs.resolve_assets_def(key).node_def
        assert node.pool == "gpu", key
        k8s = node.tags["dagster-k8s/config"]
        k8s = json.loads(k8s) if isinstance(k8s, str) else k8s
        limits = k8s["container_config"]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
    assert defs.resolve_assets_def("image_dataset").node_def.pool is None


@pytest.mark.parametrize("name", sorted(run_configs.available()))
def test_every_shipped_config_validates(name):
    validate_run_config(run_configs.load(name), JOB)


def test_bad_configs_fail_with_the_field_path():
    base = run_configs.load("demo")
    cases = [
        (("vae_model", "training", "trainer", "stepz"), 3, "stepz"),
        (("vae_model", "training", "trainer", "batch_size"), "x", "batch_size"),
        (("vae_model", "training", "trainer", "micro_batch_size"), 5, "vae_model.training.trainer"),
        (("ldm_model", "training", "diffusion", "sampler"), "euler", None),  # fine for flow
        (("ldm_model", "training", "diffusion", "kind"), "ddpm", "ldm_model.training.diffusion"),  # euler + ddpm
        (("vae_model", "resolution"), 30, "vae_model.resolution"),
    ]
    for path, value, expected in cases:
        cfg = copy.deepcopy(base)
        node = cfg["ops"][path[0]]["config"]
        for p in path[1:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
        if path[-1] == "kind":
            node["sampler"] = "euler"
        if expected is None:
            validate_run_config(cfg, JOB)
            continue
        with pytest.raises(ConfigValidationError, match=expected.replace(".", r"\.")):
            validate_run_config(cfg, JOB)


def test_posterior_sampling_is_a_trainer_option_that_needs_a_store_of_moments():
    cfg = run_configs.load("demo")
    cfg["ops"]["ldm_model"]["config"]["training"].setdefault("trainer", {})["sample_posterior"] = True
    validate_run_config(cfg, JOB)
    cfg["ops"]["latent_store"]["config"].setdefault("store", {})["content"] = "sample"
    with pytest.raises(ConfigValidationError, match=r"ldm_model\.training\.trainer\.sample_posterior: .* 'sample'"):
        validate_run_config(cfg, JOB)


def test_unet_that_cannot_downsample_the_latent_is_refused():
    cfg = run_configs.load("demo")
    cfg["ops"]["ldm_model"]["config"]["training"]["denoiser"] = {
        "preset": "tiny",
        "channel_mult": [1, 1, 1, 1, 1],
        "attention_levels": [1],
    }  # 4 downsamplings of an 8×8 latent
    with pytest.raises(ConfigValidationError, match="ldm_model.training.denoiser.channel_mult"):
        validate_run_config(cfg, JOB)


def test_dagster_definitions_validate_cli():
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    "change, field",
    [
        ({"patch_size": 3}, "ldm_model.training.denoiser"),  # the model refuses it first: its design size is 8 too
        ({"pos_embed_max_size": 2}, "ldm_model.training.denoiser"),  # the model refuses it first: it does not cover 8
        ({"sample_size": 4, "pos_embed_max_size": 2}, "ldm_model.training.denoiser.pos_embed_max_size"),  # up to 4
        ({"model_channels": 64}, "ldm_model.training.denoiser.model_channels"),  # a UNet field, not an MMDiT one
        ({"qk_norm": "layer_norm"}, "ldm_model.training.denoiser.qk_norm"),
        ({"in_channels": 16}, "ldm_model.training.denoiser.in_channels"),  # the demo's latents have 4
        ({"context_dim": 768}, "ldm_model.training.denoiser.context_dim"),  # MiniLM tokens are 384 wide
        ({"pooled_projection_dim": 2048}, "ldm_model.training.denoiser.pooled_projection_dim"),  # MiniLM pools to 384
        ({"hidden_size": 90}, "ldm_model.training.denoiser"),  # not a multiple of 4 heads / 4 (sin-cos positions)
    ],
)
def test_mmdit_shapes_are_checked_against_the_latents_before_any_work(change, field):
    cfg = run_configs.load("demo-mmdit")
    cfg["ops"]["ldm_model"]["config"]["training"]["denoiser"].update(change)
    with pytest.raises(ConfigValidationError, match=field.replace(".", r"\.") + ":"):
        validate_run_config(cfg, JOB)


def test_mmdit_latent_side_follows_the_store_resolution():
    """The latents are encoded at latent_store.store.resolution: 96 px -> 24x24 latents, more than the tiny preset's
    8 positions of 2x2 patches cover; 40 px -> 10x10 latents, which 4x4 patches do not tile."""
    cfg = run_configs.load("demo-mmdit")
    cfg["ops"]["latent_store"]["config"]["store"]["resolution"] = 96
    with pytest.raises(ConfigValidationError, match=r"pos_embed_max_size: 8 .* latent side is 24 \(= 96 / 4\)"):
        validate_run_config(cfg, JOB)
    cfg["ops"]["latent_store"]["config"]["store"]["resolution"] = 40
    cfg["ops"]["ldm_model"]["config"]["training"]["denoiser"]["patch_size"] = 4
    with pytest.raises(ConfigValidationError, match=r"patch_size: 4 does not divide the latent side 10 \(= 40 / 4\)"):
        validate_run_config(cfg, JOB)


def test_definitions_load_from_an_installed_package(tmp_path):
    """Installed without the checkout (a container image's site-packages has no pyproject.toml above pipeline/): the
    same definitions load from the package itself."""
    for package in ("pipeline", "ldm_core"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        f"import pipeline.definitions as d; assert d.__file__.startswith({str(tmp_path)!r}), d.__file__; "
        "print(sorted(k.to_user_string() for k in d.defs.resolve_asset_graph().get_all_asset_keys()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert set(json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))) >= ASSET_KEYS
