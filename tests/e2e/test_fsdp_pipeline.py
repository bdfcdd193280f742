"""The demo, end to end through `dagster job execute`, with ``compute: {strategy: fsdp, num_processes: 2}``.

The denoiser trains sharded over 2 torchrun processes (gloo on CPU) and writes sharded (DCP) checkpoints; the
autoencoder trains under DDP on the same 2 processes (strategy fsdp shards the denoiser only). The run must pass
the demo's promotion gate, so that the registered model, gathered whole from its shards, becomes the champion,
and that model must load and sample in `ldm sample`.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.faults.dagster_trial import fresh_home
from tests.e2e.helpers import ROOT, child_env, dagster_job_execute

BIN = Path(sys.executable).parent
DEMO = ROOT / "pipeline" / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def fsdp_demo(tmp_path_factory) -> Path:
    home = fresh_home(tmp_path_factory.mktemp("fsdp") / "home")
    config = yaml.safe_load(DEMO.read_text())
    config["resources"] = {"compute": {"config": {"strategy": "fsdp", "num_processes": 2}}}
    out = dagster_job_execute(home, config, timeout=1500)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return home


@pytest.mark.slow
def test_the_demo_trains_its_denoiser_sharded_and_passes_the_gate(fsdp_demo):
    home = fsdp_demo
    # the denoiser's checkpoints are sharded: a DCP directory per step and its commit record, written by 2 ranks
    records = sorted((home / "storage").rglob("step-*.dcp.json"))
    assert records, "no sharded checkpoint was written"
    record = json.loads(records[-1].read_text())
    assert record["world_size"] == 2 and record["step"] == 2000
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(record["files"])
    # the autoencoder's stay single-file (DDP)
    assert list((home / "storage").rglob("step-*.safetensors"))
    # the gate passed: the model is the champion, with the demo's metrics
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # the registry too: not the process-wide one
    champion = client.get_model_version_by_alias("ldm", "champion")
    candidate = client.get_model_version_by_alias("ldm", "candidate")
    assert champion.version == candidate.version
    metrics = json.loads(champion.tags["evaluation_metrics"])
    values = {k: metrics[k]["value"] for k in ("color_acc", "shape_acc", "psnr")}
    assert values["color_acc"] >= 0.9 and values["shape_acc"] >= 0.7 and values["psnr"] >= 18.0, values


@pytest.mark.slow
def test_the_registered_model_samples_in_ldm_sample(fsdp_demo):
    home = fsdp_demo
    out = subprocess.run(
        [
            str(BIN / "ldm"),
            "sample",
            "--model",
            "models:/ldm@champion",
            "--prompt",
            "a small red circle",
            "-n",
            "2",
            "-o",
            str(home / "fsdp.png"),
        ],
        env=child_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    from PIL import Image

    assert Image.open(home / "fsdp.png").size[0] > 0
