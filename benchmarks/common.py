"""Timing and machine description shared by the benchmarks.

Ours and the reference are timed in alternating rounds inside one process, so a noisy neighbour or a thermal
change hits both; the figure reported is the median round.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return info


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark (VmHWM; since the last `reset_peak_rss`). Not ``ru_maxrss``:
    Linux carries that across fork and exec, so a child spawned by a large parent reports the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM: peak memory is measured on Linux only")


def reset_peak_rss() -> None:
    """Start VmHWM again from the current resident size (Linux >= 4.0: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


THREADS_HELP = (
    "intra-op threads for both sides (default: torch's, one per core); on a loaded machine 1 keeps "
    "each op from waiting for a descheduled second thread"
)


def in_fresh_process(target: Callable[..., None], *args: Any) -> Any:
    """What ``target(*args, queue)`` puts on the queue, run in a spawned process: a memory figure starts from nothing
    (no peak, allocator cache or thread pool carried over from this process)."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def set_threads(n: int | None) -> None:
    """The same intra-op thread count for ours and the reference: torch's setting is per process."""
    if n is not None:
        torch.set_num_threads(n)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_alternating(
    fns: dict[str, Callable[[], None]], rounds: int, iters: int, warmup: int, device: torch.device
) -> dict[str, Any]:
    """Median seconds per call of each fn, timed in alternating rounds; each round starts with the next side, so no
    side always runs first (on a warm cache, or right after another's). With two fns, ``"ratio"``: the median of the
    per-round ratios (second ÷ first). ``"samples"``: each fn's seconds per call in every round, in round order (for
    ratios of other pairs, see `round_ratio`)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            fn = fns[name]
            sync(device)
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - t) / iters)
    out = {k: statistics.median(v) for k, v in samples.items()}
    names = list(fns)
    if len(names) == 2:
        # the ratio of each round's pair, then the median: a slow spell hits both halves of a round alike
        a, b = names
        out["ratio"] = statistics.median(sb / sa for sa, sb in zip(samples[a], samples[b]))
    out["samples"] = samples
    return out


def round_ratio(samples: dict[str, list[float]], num: str, den: str) -> float:
    """The median over rounds of ``samples[num][r] / samples[den][r]``: a slow spell hits both halves of a round."""
    return statistics.median(n / d for n, d in zip(samples[num], samples[den]))


def write_json(result: dict[str, Any], path: str | None) -> None:
    if not path:
        return
    # to a temporary file beside it, then renamed: a run stopped mid-write (SIGTERM) leaves the previous complete
    # file, never a truncated one, and of two runs writing the same path the last rename wins whole
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, target)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".ljust(widths[c]) for c in columns))


def ratio_row(label: str, result: dict, prefix: str, digits: int = 2) -> dict[str, str]:
    """One printed row of a side-by-side result: ``result[f"{prefix}_ours_images_per_s"]``, the diffusers side's and
    ``result[f"{prefix}_ratio"]``."""
    return {
        "benchmark": label,
        "ours img/s": f"{result[f'{prefix}_ours_images_per_s']:.{digits}f}",
        "diffusers img/s": f"{result[f'{prefix}_diffusers_images_per_s']:.{digits}f}",
        "ratio": f"{result[f'{prefix}_ratio']:.2f}x",
    }
