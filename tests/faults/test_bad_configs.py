"""Bad configs fail before any work starts, each with its field path: in `validate_run_config` (what `ldm demo`
and `ldm validate` call), at `ldm demo`, and at a Dagster launch (typed config for types and unknown keys, the
run-level check (the `run_config_check` resource) for the rest, before the first asset runs)."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from benchmarks.faults.bad_configs import BAD, L, S, V
from benchmarks.faults.bad_configs import set_path as _set
from benchmarks.faults.dagster_trial import fresh_home, home_env
from pipeline.config_bridge import ConfigValidationError
from pipeline.definitions import defs
from pipeline.validation import validate_run_config
from tests.common import ROOT, load_tiny_config

BIN = Path(sys.executable).parent
JOB = defs.resolve_job_def("ldm_training_job")


@pytest.fixture(scope="module")
def tiny():
    return load_tiny_config()


def test_the_base_config_is_valid(tiny):
    validate_run_config(tiny, JOB)  # so each case below fails for its own field alone


@pytest.mark.parametrize("where, value, field", BAD, ids=[f"{w.split('.config.')[-1]}={v}" for w, v, _ in BAD])
def test_each_bad_field_fails_validation_with_its_path(tiny, where, value, field):
    with pytest.raises(ConfigValidationError) as e:
        validate_run_config(_set(copy.deepcopy(tiny), where, value), JOB)
    assert field in str(e.value), str(e.value)


def test_every_problem_is_reported_at_once(tiny):
    fields = ("ldm_model.training.trainer.steps", "ldm_model.training.trainer.lr", "image_dataset.builtin_size")
    cfg = copy.deepcopy(tiny)
    for where, value, field in BAD:
        if field in fields:
            _set(cfg, where, value)
    with pytest.raises(ConfigValidationError) as e:
        validate_run_config(cfg, JOB)
    for field in fields:
        assert field in str(e.value)


def test_ldm_demo_with_a_bad_config_fails_before_anything_is_created(tiny, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_set(copy.deepcopy(tiny), f"{L}.training.trainer.checkpoint_every", 0)))
    home = tmp_path / "home"
    env = home_env(home)
    out = subprocess.run(
        [str(BIN / "ldm"), "demo", "--config", str(bad)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out.stdout + out.stderr
    # the field's full path and its bound, whichever layer (TrainerConfig or the run-level check) words it
    assert re.search(
        r"ldm_model\.training\.trainer\.checkpoint_every: .*(>= 1|greater than or equal to 1)", out.stderr
    ), out.stderr
    assert "Traceback" not in out.stderr
    assert not home.exists(), "ldm demo created LDM_HOME for a config it refused"


def test_a_dagster_launch_with_a_bad_config_fails_before_any_asset_runs(tiny, tmp_path, monkeypatch):
    # 1) `dagster job execute`: the run-level check (cross-field) fails resource initialization, before any step
    home = fresh_home(tmp_path / "home")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_set(copy.deepcopy(tiny), f"{S}.store.resolution", 30)))
    cmd = [
        str(BIN / "dagster"),
        "job",
        "execute",
        "-m",
        "pipeline.definitions",
        "-j",
        "ldm_training_job",
        "-c",
        str(bad),
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=home_env(home), capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode != 0 and "RUN_FAILURE" in log
    assert "latent_store.store.resolution: 30 is not divisible" in log
    assert "STEP_START" not in log, "an asset started before the config was refused"
    assert not (home / "storage").exists() and not (home / "mlflow.db").exists()

    # 2) in process, as the UI's launch: a wrong type is refused by Dagster's typed config before a run exists
    monkeypatch.setenv("LDM_HOME", str(tmp_path / "home2"))
    with dg.instance_for_test() as instance:
        with pytest.raises(dg.DagsterInvalidConfigError, match="trainer:steps"):
            defs.resolve_job_def("ldm_training_job").execute_in_process(
                run_config=_set(copy.deepcopy(tiny), f"{V}.training.trainer.steps", "many"), instance=instance
            )
        assert instance.get_runs() == []
        # and the cross-field check refuses a run whose types are fine
        result = defs.resolve_job_def("ldm_training_job").execute_in_process(
            run_config=_set(copy.deepcopy(tiny), f"{L}.training.denoiser.in_channels", 8),
            instance=instance,
            raise_on_error=False,
        )
        assert not result.success
        assert result.get_asset_materialization_events() == []
        assert "ldm_model.training.denoiser.in_channels" in str(result.all_events)
    assert not (tmp_path / "home2").exists()
