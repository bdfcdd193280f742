"""benchmarks/gpu_check.sh, dry-run on the CPU (GPU_CHECK_DEVICE=cpu, smaller sizes): the script parses, every
command it runs takes its arguments, and each part's result lands where the script says."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _dry_run(out: Path, parts: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), str(out)],
        cwd=ROOT,
        env={
            **os.environ,
            "GPU_CHECK_DEVICE": "cpu",
            "GPU_CHECK_QUICK": "1",
            "GPU_CHECK_PARTS": parts,
            "GPU_CHECK_TIMEOUT_SCALE": "3",
            "PYTHON": sys.executable,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=300,
    )


def _summary(out: Path) -> dict[str, str]:
    lines = (out / "summary.txt").read_text().splitlines()
    return {line.split(":")[0]: line.split(":", 1)[1] for line in lines}


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_fsdp_part_trains_under_torchrun_and_reports_the_loss(tmp_path):
    r = _dry_run(tmp_path, "fsdp")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _summary(tmp_path)["fsdp-smoke"].startswith(" ok")
    smoke = json.loads((tmp_path / "fsdp-smoke.json").read_text())
    assert smoke["decreasing"] and smoke["losses"][-1] < smoke["losses"][0]
    assert "decreasing" in (tmp_path / "fsdp-smoke.log").read_text()


@pytest.mark.slow
def test_train_part_reports_rates_and_mfu_against_the_given_peak(tmp_path):
    # ~80 s on 2 cores: the UNet benchmark's demo config is its smallest
    r = _dry_run(tmp_path, "train", GPU_CHECK_PEAK_TFLOPS="0.001")
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(v.startswith(" ok") for v in _summary(tmp_path).values()), _summary(tmp_path)
    table = (tmp_path / "train-mfu.log").read_text().splitlines()
    rows = [line for line in table if line.startswith("| unet") or line.startswith("| mmdit")]
    assert len(rows) == 2, table
    for row in rows:
        mfu_ours, mfu_theirs = row.strip("| ").split(" | ")[-2:]
        assert mfu_ours.endswith("%") and mfu_theirs.endswith("%"), row


def test_a_failing_part_fails_the_check(tmp_path):
    r = _dry_run(tmp_path, "train", GPU_CHECK_QUICK="0", PYTHON="false")
    assert r.returncode == 1
    assert "FAILED" in (tmp_path / "summary.txt").read_text()
