"""The LoRA example config (pipeline/configs/pretrained/lora.yaml), shrunk to tiny.yaml's sizes, through
`dagster job execute`: the denoiser trains an adapter only, checkpoints it without the base, and registers the base
plus the adapter, which generates."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ldm_core.bundle import load_text_to_image
from ldm_core.checkpoint import CheckpointManager
from ldm_core.lora import adapter_state_dict, has_lora, lora_config
from ldm_core.model_io import read_model_meta
from tests.e2e.conftest import TINY, child_env

ROOT = Path(__file__).resolve().parents[2]
LORA_CONFIG = ROOT / "pipeline" / "configs" / "pretrained" / "lora.yaml"
BIN = Path(sys.executable).parent


def _merge(base: dict, over: dict) -> dict:
    """``base`` with ``over``'s values in place of its own, section by section."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    home = tmp / "home"
    (home / "dagster").mkdir(parents=True)
    (home / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    config = _merge(yaml.safe_load(LORA_CONFIG.read_text()), yaml.safe_load(TINY.read_text()))
    # the example's gate targets are the demo's, which six training steps cannot meet: not what this test is about
    config["ops"]["evaluation_report"]["config"]["evaluation"].pop("gate")
    assert config["ops"]["ldm_model"]["config"]["training"]["lora"] == {"rank": 8, "alpha": 8, "dropout": 0.0}
    path = tmp / "lora.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [str(BIN / "dagster"), "job", "execute", "-m", "pipeline.definitions", "-j", "ldm_training_job",
           "-c", str(path)]
    out = subprocess.run(cmd, cwd=ROOT, env=child_env(home), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "RUN_SUCCESS" in out.stdout + out.stderr
    return home


def test_the_registered_model_is_the_base_plus_the_adapter_and_generates(lora_run):
    client = MlflowClient(tracking_uri=f"sqlite:///{lora_run / 'mlflow.db'}")
    version = client.get_model_version_by_alias("ldm", "candidate")
    url = version.tags["storage_url"]
    model = load_text_to_image(url)
    assert has_lora(model.denoiser)
    assert lora_config(model.denoiser).rank == 8
    assert read_model_meta(f"{url}/denoiser/lora")["base"]["sha256"] == \
        read_model_meta(f"{url}/denoiser")["weights_sha256"]
    images = model.generate(["a large red circle in the center"], steps=2)
    assert images.shape == (1, 32, 32, 3)
    # only the adapter trained: the run's parameter count is the adapter's
    run = client.get_run(version.run_id)
    n_adapter = sum(v.numel() for v in adapter_state_dict(model.denoiser).values())
    assert run.data.params["lora.rank"] == "8" and run.data.params["denoiser_parameters"] == str(n_adapter)


def test_the_checkpoint_holds_the_adapter_not_the_base(lora_run):
    (ckpt_dir,) = (lora_run / "storage" / "checkpoints" / "ldm").iterdir()
    _, state = CheckpointManager(str(ckpt_dir)).load_latest()
    assert state["model"] and all(".lora_" in k for k in state["model"])
    assert len(state["base"]["sha256"]) == 64
