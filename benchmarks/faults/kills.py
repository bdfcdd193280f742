"""Sections 1 and 2 of the fault campaign: jobs SIGKILLed and resumed, alone and under ``dagster job execute``."""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.faults import campaign
from benchmarks.faults.dagster_trial import dagster_kill_trial
from benchmarks.faults.table import JOB_NAMES, Row, row


def kills(root: Path, trials: int, rng: random.Random, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    shared = campaign.prepare_inputs(root)
    rows, details = [], []
    for job in campaign.JOBS:
        t0 = time.monotonic()
        ref = campaign.reference_run(job, root, shared)
        done = []
        for i in range(trials):
            t = campaign.kill_trial(ref, i, root, shared, rng, kills=1 + i % 2)
            done.append(t)
            log(
                f"  {job} trial {i}: {[k['where'] for k in t.kills]} -> "
                f"{'equal' if t.equal else 'DIFFERENT'} ({t.detail})"
            )
            shutil.rmtree(root / job / f"trial-{i:03d}", ignore_errors=True)
        s = campaign.summarize(done)[job]
        resumed = sum(1 for t in done if t.resumed_from)
        notes = (
            f"{s['kills_sent']} kills sent, {s['faults_hit']} hit a running job; window {ref.window:.1f}s"
            + (f"; {resumed} resumed from a checkpoint" if job in ("ae", "ldm") else "")
            + (f"; stale temp files left: {s['stale_temp_files']}" if s["stale_temp_files"] else "")
        )
        equal_word = "bitwise equal" if job in ("ae", "ldm") else "row-exact"
        rows.append(
            row(
                "kill + resume",
                JOB_NAMES[job],
                s["trials"],
                s["faults_hit"],
                s["survived"],
                f"{s['equal']}/{s['trials']} {equal_word}",
                time.monotonic() - t0,
                notes,
            )
        )
        details.append(
            {
                "job": job,
                "reference_window_s": ref.window,
                "summary": s,
                "trials": [campaign.trial_json(t) for t in done],
            }
        )
    return rows, details


def dagster(root: Path, trials: int, rng: random.Random, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    rows, outs = [], []
    for asset in ("vae_model", "ldm_model"):
        t0, done = time.monotonic(), []
        for i in range(trials):
            if asset == "vae_model":
                kill_at = rng.choice(range(2, 20, 2))
                out = dagster_kill_trial(root / f"{asset}-{i}", kill_at_step=kill_at, vae_steps=24)
            else:
                kill_at = rng.choice(range(5, 35, 5))
                out = dagster_kill_trial(
                    root / f"{asset}-{i}", asset=asset, kill_at_step=kill_at, vae_steps=6, ldm_steps=40
                )
            ok = (
                out.get("rerun_success")
                and out["registered_after_kill"] == 0
                and out["resumed_from"] >= kill_at
                and out["weights_equal"]
                and out["registry_points_at_complete_model"]
                and (asset == "vae_model" or (out["vae_reused"] and out["store_rows_new"] == 0))
            )
            out["ok"] = bool(ok)
            done.append(out)
            log(
                f"  dagster {asset} trial {i}: killed after step {out['killed_after_step']}, resumed_from "
                f"{out.get('resumed_from')}, weights equal {out.get('weights_equal')}"
            )
        good = sum(o["ok"] for o in done)
        notes = "; ".join(
            f"killed at step {o['killed_after_step']}, resumed_from {o.get('resumed_from')}" for o in done
        )
        extra = "" if asset == "vae_model" else ", VAE reused, 0 rows re-encoded"
        rows.append(
            row(
                "kill + resume",
                f"dagster job execute ldm_training_job, in {asset}",
                trials,
                trials,
                good,
                f"{good}/{trials} resumed, bitwise equal{extra}, nothing registered before",
                time.monotonic() - t0,
                notes,
            )
        )
        outs += done
    return rows, outs
