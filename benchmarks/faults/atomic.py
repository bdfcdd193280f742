"""Section 3 of the fault campaign: an artifact rewritten over and over and SIGKILLed mid-write stays whole."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.faults import campaign
from benchmarks.faults.injectors import WRITE_LOOP, whole_version
from benchmarks.faults.table import Row, row
from ldm_core import storage


def atomic(root: Path, kills_n: int, rng: random.Random, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    t0 = time.monotonic()
    d = root / "atomic"
    d.mkdir(parents=True, exist_ok=True)
    target = d / "artifact.bin"
    whole, versions = 0, set()
    for _ in range(kills_n):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITE_LOOP, str(target), str(8 << 20)],
            cwd=campaign.ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        data = target.read_bytes()
        whole += whole_version(data)
        versions.add(int(data[:16]))
    leftovers = len([p for p in d.iterdir() if p.name != target.name])
    removed = storage.remove_stale_temp_files(str(d))
    clean = [p.name for p in d.iterdir()] == [target.name]
    result = f"{whole}/{kills_n} whole; {leftovers} temp files left by kills, {len(removed)} removed"
    return [
        row(
            "atomic write",
            "write_bytes_atomic under SIGKILL (8 MiB)",
            kills_n,
            kills_n,
            whole if clean else 0,
            result,
            time.monotonic() - t0,
            f"{len(versions)} distinct versions seen",
        )
    ], {"kills": kills_n, "whole": whole, "leftovers": leftovers, "removed": len(removed)}
