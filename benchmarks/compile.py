"""torch.compile (Inductor) of the UNet train step, ours and diffusers, with the compile time counted.

    python -m benchmarks.compile [--config demo|mid] [--sides ours,diffusers] [--precision fp32|bf16] [--steps 5]

For each side: the eager step's median time, the first compiled step (compilation included) and the compiled
step's median time, at identical weights and the same fused AdamW (benchmarks.unet's configs). The mid config takes
minutes per side to compile on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from benchmarks.common import THREADS_HELP, machine_info, print_table, set_threads, write_json
from benchmarks.unet import CONFIGS, autocast, setup, train_step
from ldm_core.trainers.step import make_adam


def _median_s(step: Callable[[], None], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(name: str, sides: list[str], precision: str = "fp32", steps: int = 5) -> list[dict]:
    dev = torch.device("cpu")
    su = setup(name, dev)  # identical weights, one batch
    amp = autocast(dev, precision)
    rows = []
    for side in sides:
        net = su.ours if side == "ours" else su.theirs
        opt = make_adam(list(net.parameters()), dev, adamw=True, lr=1e-4)
        eager = train_step(su.forward(side), su.target, opt, amp)
        eager()
        eager_s = _median_s(eager, steps)
        compiled = train_step(su.forward(side, torch.compile(net)), su.target, opt, amp)
        t0 = time.perf_counter()
        compiled()
        first_s = time.perf_counter() - t0
        compiled()
        compiled_s = _median_s(compiled, steps)
        rows.append(
            {
                "config": name,
                "side": side,
                "precision": precision,
                "eager_s": eager_s,
                "first_compiled_step_s": first_s,
                "compiled_s": compiled_s,
                "speedup": eager_s / compiled_s,
                # steps after which the compiled run has caught up with eager (None: never)
                "break_even_steps": first_s / (eager_s - compiled_s) if compiled_s < eager_s else None,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs with a fresh Inductor cache directory unless --warm-cache: a cache left by an earlier run makes the first
    compiled step a cache load (8 s instead of ~190 s for the mid UNet), which is not what a new run pays."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(CONFIGS), default="mid")
    p.add_argument("--sides", default="ours,diffusers")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--warm-cache", action="store_true", help="keep Inductor's on-disk cache (default: a fresh one)")
    a = p.parse_args(argv)
    set_threads(a.threads)
    if not a.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
    rows = run(a.config, a.sides.split(","), a.precision, a.steps)
    m = machine_info()
    print(f"machine: {m['cpu']} | {m['threads']} threads | torch {m['torch']}")
    print_table(
        [
            {
                "side": r["side"],
                "eager s/step": f"{r['eager_s']:.3f}",
                "first compiled step s": f"{r['first_compiled_step_s']:.1f}",
                "compiled s/step": f"{r['compiled_s']:.3f}",
                "speedup": f"{r['speedup']:.2f}x",
                "break-even steps": f"{r['break_even_steps']:.0f}" if r["break_even_steps"] else "never",
            }
            for r in rows
        ],
        ["side", "eager s/step", "first compiled step s", "compiled s/step", "speedup", "break-even steps"],
    )
    write_json({"machine": m, "rows": rows, "inductor_cache": "warm" if a.warm_cache else "fresh"}, a.json)
    return rows


if __name__ == "__main__":
    main()
