"""Section 7 of the fault campaign: every bad field of `bad_configs` fails validation naming its field; `ldm demo`
and a `dagster job execute` with a bad config fail before any work."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from benchmarks.faults import campaign
from benchmarks.faults.bad_configs import BAD, set_path
from benchmarks.faults.dagster_trial import TINY, fresh_home, home_env
from benchmarks.faults.table import Row, row
from pipeline.config_bridge import ConfigValidationError
from pipeline.definitions import get_training_job
from pipeline.validation import validate_run_config


def configs(root: Path, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    t0 = time.monotonic()
    tiny = yaml.safe_load(TINY.read_text())
    job = get_training_job()
    validate_run_config(tiny, job)
    caught, details = 0, []
    for where, value, field in BAD:
        try:
            validate_run_config(set_path(copy.deepcopy(tiny), where, value), job)
            outcome = "accepted"
        except ConfigValidationError as e:
            outcome = "named" if field in str(e) else f"not named: {e}"
        caught += outcome == "named"
        details.append({"field": where, "value": repr(value), "outcome": outcome})
    rows = [
        row(
            "bad config",
            "validate_run_config (one bad field each)",
            len(BAD),
            len(BAD),
            caught,
            f"{caught}/{len(BAD)} refused naming the field",
            time.monotonic() - t0,
        )
    ]

    # the entry points: `ldm demo` and `dagster job execute`, each with a config only ldm_core can refuse
    t0 = time.monotonic()
    bin_dir = Path(sys.executable).parent
    bad = root / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(set_path(copy.deepcopy(tiny), "ops.ldm_model.config.training.trainer.checkpoint_every", 0))
    )
    home = root / "bad-home"
    demo = subprocess.run(
        [str(bin_dir / "ldm"), "demo", "--config", str(bad)],
        cwd=campaign.ROOT,
        env=home_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    demo_ok = demo.returncode == 2 and "checkpoint_every" in demo.stderr and not home.exists()
    home = fresh_home(root / "bad-home-dagster")
    run = subprocess.run(
        [
            str(bin_dir / "dagster"),
            "job",
            "execute",
            "-m",
            "pipeline.definitions",
            "-j",
            "ldm_training_job",
            "-c",
            str(bad),
        ],
        cwd=campaign.ROOT,
        env=home_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = run.stdout + run.stderr
    dagster_ok = (
        run.returncode != 0
        and "checkpoint_every" in text
        and "STEP_START" not in text
        and not (home / "storage").exists()
    )
    n = demo_ok + dagster_ok
    rows.append(
        row(
            "bad config",
            "ldm demo / dagster job execute",
            2,
            2,
            n,
            f"{n}/2 refused before any asset ran, field named",
            time.monotonic() - t0,
        )
    )
    details.append({"ldm_demo": demo_ok, "dagster_job_execute": dagster_ok})
    log(f"  configs: {caught}/{len(BAD)} named; ldm demo {demo_ok}, dagster {dagster_ok}")
    return rows, details
