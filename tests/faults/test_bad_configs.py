"""Bad configs fail before any work starts, each with its field path: in `validate_run_config` (what `ldm demo`
and `ldm validate` call), at `ldm demo`, and at a Dagster launch (typed config for types and unknown keys, the
storage resource's run-level check for the rest, before the first asset runs)."""

import copy
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from pipeline.config_bridge import ConfigValidationError
from pipeline.validation import validate_run_config
from tests.faults.dagster_trial import TINY, fresh_home, home_env

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
V, L, S, I, E = (f"ops.{a}.config" for a in ("vae_model", "ldm_model", "latent_store", "image_dataset", "evaluation_report"))

# (where, bad value, the field path the message must name)
BAD = [
    # wrong types and unknown keys: Dagster's typed config
    (f"{V}.training.trainer.steps", "many", "root:ops:vae_model:config:training:trainer:steps"),
    (f"{V}.training.trainer.stepz", 3, "stepz"),
    ("ops.vae_modle", {"config": {}}, "vae_modle"),
    ("resources.storage.config.root", 5, "root:resources:storage:config:root"),
    # values ldm_core's models refuse
    (f"{L}.training.diffusion.kind", "score", "ldm_model.training.diffusion.kind"),
    (f"{V}.training.trainer.precision", "fp8", "vae_model.training.trainer.precision"),
    (f"{V}.training.model.preset", "nope", "vae_model.training.model"),
    (f"{S}.store.backend", "hdf5", "latent_store.store.backend"),
    (f"{I}.ingest.val_fraction", 1.5, "image_dataset.ingest.val_fraction"),
    (f"{E}.evaluation.grid_size", 0, "evaluation_report.evaluation.grid_size"),
    (f"{V}.training.loss.disc_start", -5, "vae_model.training.loss.disc_start"),
    # impossible combinations inside one section
    (f"{L}.training.trainer.micro_batch_size", 3, "ldm_model.training.trainer"),  # batch 8 not divisible by 3
    (f"{V}.training.trainer.micro_batch_size", 3, "vae_model.training.trainer"),
    (f"{L}.training.diffusion.sampler", "ddim", "ldm_model.training.diffusion"),  # a DDPM sampler for a flow
    (f"{L}.training.trainer.cond_dropout", 2.0, "ldm_model.training.trainer"),
    (f"{L}.training.denoiser.num_heads", 3, "ldm_model.training.denoiser"),  # width 64 over 3 heads
    # bounds the trainer configs leave open (a 0 checkpoint_every divides by zero at step 1)
    (f"{L}.training.trainer.steps", 0, "ldm_model.training.trainer.steps"),
    (f"{L}.training.trainer.lr", -1.0, "ldm_model.training.trainer.lr"),
    (f"{V}.training.trainer.checkpoint_every", 0, "vae_model.training.trainer.checkpoint_every"),
    (f"{L}.training.trainer.ema_decay", 1.5, "ldm_model.training.trainer.ema_decay"),
    (f"{L}.training.trainer.warmup_steps", -1, "ldm_model.training.trainer.warmup_steps"),
    (f"{L}.training.trainer.device", "gpu0", "ldm_model.training.trainer.device"),
    (f"{S}.text_encoder.max_length", 0, "latent_store.text_encoder.max_length"),
    (f"{I}.builtin_size", 8, "image_dataset.builtin_size"),
    (f"{L}.validation_seeds", 0, "ldm_model.validation_seeds"),
    (f"{L}.guidance", -1.0, "ldm_model.guidance"),
    ("resources.compute.config.precision", "fp4", "resources.compute.precision"),
    # combinations across assets
    (f"{L}.training.denoiser.channel_mult", [1, 2, 2, 2, 2], "ldm_model.training.denoiser.channel_mult"),  # 8×8 latent
    (f"{V}.resolution", 30, "vae_model.resolution"),  # not divisible by the VAE's factor 4
    (f"{S}.store.resolution", 30, "latent_store.store.resolution"),
    (f"{L}.training.denoiser.in_channels", 8, "ldm_model.training.denoiser.in_channels"),  # the VAE has 4
    (f"{L}.training.denoiser.context_dim", 768, "ldm_model.training.denoiser.context_dim"),  # MiniLM gives 384
    (f"{V}.training.trainer.batch_size", 64, "vae_model.training.trainer.batch_size"),  # only 48 images
]


def _set(cfg: dict, path: str, value) -> dict:
    keys = path.split(".")
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return cfg


@pytest.fixture(scope="module")
def tiny():
    return yaml.safe_load(TINY.read_text())


def test_the_base_config_is_valid(tiny):
    validate_run_config(tiny)  # so each case below fails for its own field alone


@pytest.mark.parametrize("where, value, field", BAD, ids=[f"{w.split('.config.')[-1]}={v}" for w, v, _ in BAD])
def test_each_bad_field_fails_validation_with_its_path(tiny, where, value, field):
    with pytest.raises(ConfigValidationError) as e:
        validate_run_config(_set(copy.deepcopy(tiny), where, value))
    assert field in str(e.value), str(e.value)


def test_every_problem_is_reported_at_once(tiny):
    fields = ("ldm_model.training.trainer.steps", "ldm_model.training.trainer.lr", "image_dataset.builtin_size")
    cfg = copy.deepcopy(tiny)
    for where, value, field in BAD:
        if field in fields:
            _set(cfg, where, value)
    with pytest.raises(ConfigValidationError) as e:
        validate_run_config(cfg)
    for field in fields:
        assert field in str(e.value)


def test_ldm_demo_with_a_bad_config_fails_before_anything_is_created(tiny, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_set(copy.deepcopy(tiny), f"{L}.training.trainer.checkpoint_every", 0)))
    home = tmp_path / "home"
    env = home_env(home)
    out = subprocess.run([str(BIN / "ldm"), "demo", "--config", str(bad)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "ldm_model.training.trainer.checkpoint_every: 0 must be >= 1" in out.stderr
    assert "Traceback" not in out.stderr
    assert not home.exists(), "ldm demo created LDM_HOME for a config it refused"


def test_a_dagster_launch_with_a_bad_config_fails_before_any_asset_runs(tiny, tmp_path, monkeypatch):
    # 1) `dagster job execute`: the run-level check (cross-field) fails resource initialization, before any step
    home = fresh_home(tmp_path / "home")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_set(copy.deepcopy(tiny), f"{S}.store.resolution", 30)))
    out = subprocess.run([str(BIN / "dagster"), "job", "execute", "-m", "pipeline.definitions", "-j", "ldm_training_job",
                          "-c", str(bad)], cwd=ROOT, env=home_env(home), capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode != 0 and "RUN_FAILURE" in log
    assert "latent_store.store.resolution: 30 is not divisible" in log
    assert "STEP_START" not in log, "an asset started before the config was refused"
    assert not (home / "storage").exists() and not (home / "mlflow.db").exists()

    # 2) in process, as the UI's launch: a wrong type is refused by Dagster's typed config before a run exists
    monkeypatch.setenv("LDM_HOME", str(tmp_path / "home2"))
    from pipeline.definitions import defs

    with dg.instance_for_test() as instance:
        with pytest.raises(dg.DagsterInvalidConfigError, match="trainer:steps"):
            defs.resolve_job_def("ldm_training_job").execute_in_process(
                run_config=_set(copy.deepcopy(tiny), f"{V}.training.trainer.steps", "many"), instance=instance)
        assert instance.get_runs() == []
        # and the cross-field check refuses a run whose types are fine
        result = defs.resolve_job_def("ldm_training_job").execute_in_process(
            run_config=_set(copy.deepcopy(tiny), f"{L}.training.denoiser.in_channels", 8), instance=instance,
            raise_on_error=False)
        assert not result.success
        assert result.get_asset_materialization_events() == []
        assert "ldm_model.training.denoiser.in_channels" in str(result.all_events)
    assert not (tmp_path / "home2").exists()
