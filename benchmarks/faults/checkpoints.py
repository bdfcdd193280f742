"""Section 4 of the fault campaign: a damaged newest checkpoint, and every checkpoint damaged: the trainer falls back
with a warning and still ends bit-equal to an uninterrupted run."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.faults import runner
from benchmarks.faults.table import JOB_NAMES, Row, row


def _damage(ckpt: Path, how: str) -> None:
    body = ckpt / "step-000000004.safetensors"
    if how == "truncate":
        body.write_bytes(body.read_bytes()[: body.stat().st_size // 2])
    elif how == "flip_byte":
        data = bytearray(body.read_bytes())
        data[len(data) // 2] ^= 0xFF
        body.write_bytes(bytes(data))
    elif how == "no_commit_record":
        (ckpt / "step-000000004.sha256").unlink()
    else:  # every checkpoint
        for p in ckpt.glob("*.safetensors"):
            p.write_bytes(b"garbage")


def checkpoints(root: Path, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    rows, details = [], []
    logging.getLogger("ldm_core.checkpoint").setLevel(logging.WARNING)
    for job in ("ae", "ldm"):
        t0 = time.monotonic()
        ref = runner.train(job, runner.clean_data(job), root / f"ckpt-{job}-ref", steps=6)
        ok = 0
        damages = ("truncate", "flip_byte", "no_commit_record", "every_checkpoint")
        for how in damages:
            d = root / f"ckpt-{job}-{how}"
            runner.train(job, runner.clean_data(job), d, steps=6, stop_at=4)
            _damage(d, how)
            warnings: list[str] = []
            handler = logging.Handler()
            handler.emit = lambda r, sink=warnings: sink.append(r.getMessage())  # type: ignore[method-assign]
            logging.getLogger("ldm_core.checkpoint").addHandler(handler)
            try:
                res = runner.train(job, runner.clean_data(job), d, steps=6)
            finally:
                logging.getLogger("ldm_core.checkpoint").removeHandler(handler)
            expected_from = None if how == "every_checkpoint" else 3
            good = (
                res.resumed_from == expected_from
                and runner.same_weights(res, ref)
                and any("falling back" in w for w in warnings)
            )
            ok += good
            details.append({"job": job, "damage": how, "resumed_from": res.resumed_from, "ok": good})
            log(f"  {job} {how}: resumed_from {res.resumed_from}, equal {runner.same_weights(res, ref)}")
        rows.append(
            row(
                "corrupt checkpoint",
                f"{JOB_NAMES[job]}: {', '.join(damages)}",
                len(damages),
                len(damages),
                ok,
                f"{ok}/{len(damages)} fell back with a warning, bitwise equal",
                time.monotonic() - t0,
                "resumed from step 3 (previous good); every-checkpoint-corrupt starts over",
            )
        )
    return rows, details
