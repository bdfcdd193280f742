"""Section 6 of the fault campaign: NaN batches are skipped and counted; data that turns NaN for good stops the run
with the last good checkpoint intact and resumable."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.faults import runner
from benchmarks.faults.injectors import PoisonedAfter
from benchmarks.faults.table import JOB_NAMES, Row, row
from ldm_core.checkpoint import CheckpointManager
from ldm_core.trainers.data_order import DataPosition, EpochBatchSampler
from ldm_core.trainers.step import NonFiniteLossError


def _expected_skips(n_items: int, micro: int, accum: int, seed: int, steps: int, bad: int) -> int:
    """Steps whose micro-batches include item ``bad``, in the trainer's own data order."""
    it = EpochBatchSampler(n_items, micro, seed=seed).iterate(DataPosition())
    step_batches = [[next(it)[1] for _ in range(accum)] for _ in range(steps)]  # every micro-batch drawn, in order
    return sum(any(bad in b for b in batches) for batches in step_batches)


def numerical(root: Path, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    rows, details = [], []
    for job in ("ae", "ldm"):
        # isolated NaN rows: every step that draws one is skipped and counted, the rest train
        t0 = time.monotonic()
        data = runner.clean_data(job)
        key = "image" if job == "ae" else "latents"
        data.columns[key][5].fill_(float("nan"))
        steps = 12
        res = runner.train(job, data, root / f"nan-{job}", steps=steps)
        tc = (runner.ae_config if job == "ae" else runner.ldm_config)(steps).trainer
        micro = tc.micro_batch_size or tc.batch_size
        expected = _expected_skips(len(data), micro, tc.batch_size // micro, tc.seed, steps, bad=5)
        finite = all(torch.isfinite(v).all() for v in res.model.state_dict().values())
        good = res.nonfinite_skipped == expected and finite
        rows.append(
            row(
                "numerical",
                f"{JOB_NAMES[job]}: one NaN row in the data",
                1,
                expected,
                expected if good else 0,
                f"{res.nonfinite_skipped} steps skipped and counted (expected {expected}), weights finite",
                time.monotonic() - t0,
            )
        )
        details.append({"job": job, "case": "isolated", "skipped": res.nonfinite_skipped, "expected": expected})

        # data that turns NaN for good: stop, last good checkpoint intact, resumable
        t0 = time.monotonic()
        d = root / f"nan-forever-{job}"
        try:
            runner.train(job, PoisonedAfter(runner.clean_data(job), good_batches=8), d, steps=10, max_nonfinite=1)
            stopped = False
        except NonFiniteLossError:
            stopped = True
        mgr = CheckpointManager(str(d))
        step, last = mgr.load_latest()
        intact = step == 5 and all(torch.equal(v, mgr.load(4)["model"][k]) for k, v in last["model"].items())
        resumed = runner.train(job, runner.clean_data(job), d, steps=7, max_nonfinite=1)
        good = stopped and intact and resumed.resumed_from == 5
        rows.append(
            row(
                "numerical",
                f"{JOB_NAMES[job]}: data NaN for good",
                1,
                2,
                2 if good else 0,
                "stopped; last checkpoint verifies, unchanged by the skipped step; resumes"
                if good
                else f"FAILED stopped={stopped} intact={intact}",
                time.monotonic() - t0,
            )
        )
        details.append({"job": job, "case": "persistent", "stopped": stopped, "intact": intact})
        log(f"  {job}: isolated {res.nonfinite_skipped}/{expected}, persistent stopped={stopped} intact={intact}")
    return rows, details
