"""``python -m benchmarks.faults``: run the fault campaign's sections and print its table (see the package's doc)."""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread: subprocess jobs and in-process references agree

import torch  # noqa: E402  (after the thread count is set)

import benchmarks.faults  # noqa: E402
from benchmarks.common import machine_info, print_table, write_json  # noqa: E402
from benchmarks.faults import (  # noqa: E402
    adversarial,
    atomic,
    bitrot,
    checkpoints,
    configs,
    kills,
    numerical,
    preemption,
    rank_loss,
    storage_faults,
    writers,
)
from benchmarks.faults.table import Row  # noqa: E402

SECTIONS = (
    "kills",
    "dagster",
    "atomic",
    "checkpoints",
    "storage",
    "numerical",
    "configs",
    "adversarial",
    "preemption",
    "writers",
    "bitrot",
    "rank_loss",
)


def run(
    trials: int,
    seed: int,
    workdir: Path,
    only: tuple[str, ...],
    dagster_trials: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    torch.set_num_threads(1)
    rng = random.Random(seed)
    result: dict[str, Any] = {"machine": machine_info(), "seed": seed, "trials_per_job": trials, "sections": {}}
    rows: list[Row] = []
    t0 = time.monotonic()
    steps: dict[str, Callable[[], tuple[list[Row], Any]]] = {
        "kills": lambda: kills.kills(workdir / "kills", trials, rng, log),
        "dagster": lambda: kills.dagster(workdir / "dagster", dagster_trials, rng, log),
        "atomic": lambda: atomic.atomic(workdir, max(10, 2 * trials), rng, log),
        "checkpoints": lambda: checkpoints.checkpoints(workdir / "checkpoints", log),
        "storage": lambda: storage_faults.storage_faults(workdir, log),
        "numerical": lambda: numerical.numerical(workdir / "numerical", log),
        "configs": lambda: configs.configs(workdir, log),
        "adversarial": lambda: adversarial.adversarial(workdir, log),
        "preemption": lambda: preemption.preemption(workdir / "preemption", max(1, trials // 2), rng, log),
        "writers": lambda: writers.writers(workdir / "writers", max(1, trials // 2), log),
        "bitrot": lambda: bitrot.bitrot(workdir / "bitrot", rng, log),
        "rank_loss": lambda: rank_loss.rank_loss(workdir / "rank_loss", max(1, trials // 2), rng, log),
    }
    for name in SECTIONS:
        if name not in only:
            continue
        log(f"[{name}]")
        s = time.monotonic()
        section_rows, details = steps[name]()
        rows += section_rows
        result["sections"][name] = {"rows": section_rows, "details": details, "seconds": time.monotonic() - s}
    result["rows"] = rows
    result["totals"] = {
        "rows": len(rows),
        "trials": sum(r["trials"] for r in rows),
        "faults": sum(r["faults"] for r in rows),
        "survived": sum(r["survived"] for r in rows),
        "all_survived": all(r["faults"] == r["survived"] for r in rows),
    }
    result["seconds"] = time.monotonic() - t0
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.faults",
        description=benchmarks.faults.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--trials", type=int, default=10, help="kill trials per job (default 10)")
    p.add_argument("--dagster-trials", type=int, default=1, help="killed dagster job executions (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 kill trials per job (a smoke run)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    p.add_argument("--json", default="benchmarks/results/faults.json")
    p.add_argument("--workdir", default=None, help="keep the campaign's files here (default: a temp dir, removed)")
    a = p.parse_args(argv)
    only = tuple(s.strip() for s in a.only.split(",") if s.strip())
    unknown = set(only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    trials = 2 if a.quick else a.trials
    tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="ldm-faults-")
    workdir = Path(a.workdir or tmp.name)  # type: ignore[union-attr]
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run(trials, a.seed, workdir, only, a.dagster_trials)
    finally:
        if tmp is not None:
            tmp.cleanup()
    m, t = result["machine"], result["totals"]
    print(
        f"\nfault campaign: seed {a.seed}, {trials} kill trials per job | {m['cpu']} | torch {m['torch']} | "
        f"{result['seconds'] / 60:.1f} min"
    )
    print_table(result["rows"], ["category", "case", "trials", "faults", "survived", "result", "seconds", "notes"])
    print(
        f"\ntotal: {t['trials']} trials, {t['faults']} faults injected, {t['survived']} survived"
        f"{'' if t['all_survived'] else '  <-- NOT ALL SURVIVED'}"
    )
    write_json(result, a.json)
    return result


if __name__ == "__main__":
    main()
