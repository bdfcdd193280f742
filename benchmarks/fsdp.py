"""Memory per rank and step time, DDP vs FSDP2, on SD3-medium's width with fewer joint blocks.

    python -m benchmarks.fsdp [--quick] [--depth 2] [--json PATH]  # default benchmarks/results/fsdp.json (the README's
                                                                  # "fsdp" block); --quick: fsdp-quick.json, not it
    python -m benchmarks.fsdp --render benchmarks/results/fsdp.json     # the README's markdown, from the JSON
    torchrun --nproc-per-node 1 -m benchmarks.fsdp smoke [--device cuda] [--precision bf16] [--steps 8] [--preset P]

Every measurement spawns its own process group (gloo on loopback, one thread per rank), so no allocation of another
measurement lingers. Memory: each rank builds the model from one seed, wraps it (DistributedDataParallel as the
trainers do, or `ldm_core.fsdp.shard_model`: `fully_shard` per joint block, then the root), builds the trainers'
fused AdamW (`ldm_core.trainers.step.make_adam`) and takes one full step (forward, backward, AdamW); then it counts
the bytes it holds of parameters, gradients and optimizer state (exp_avg, exp_avg_sq, step), each the local shard
(`to_local()`) under FSDP. Two counts: "local" is the elements of the local shards; "held" is the distinct storages
those shards live in, which is what the rank pays: FSDP2 pads each parameter's shard to ceil(rows / N) rows and
keeps each group's gradients in one reduce-scatter buffer. Not in either count: DDP's reducer keeps a second,
bucketed copy of the gradients (the trainers wrap without gradient_as_bucket_view), and buffers (the positional
grid) are replicated under both; both are in the peak RSS column, with the framework and the activations.

Step time: one process group of 2 ranks holds a DDP model and an FSDP model built from the same seed, with the same
optimizer and the same batch; rounds alternate which runs first; each side's figure is the median step of a round
(a barrier after every step, so a step is the slowest rank's), and the ratio is the median of the rounds' ratios.

`smoke` is the GPU check's FSDP run: a few AdamW steps of a small sharded MMDiT on one fixed batch, the loss printed
at each; it fails unless the last loss is below the first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from benchmarks.common import machine_info, peak_rss_bytes, print_table, write_json
from ldm_core.distributed import wrap_ddp
from ldm_core.fsdp import build_sharded, local, shard_model
from ldm_core.models.mmdit import MMDIT_PRESETS, MMDiT, MMDiTConfig
from ldm_core.trainers.step import make_adam

MB = 2**20
GOAL_TOLERANCE = 0.10  # FSDP's per-rank state within 10% of 1/N of DDP's


# ---------------------------------------------------------------------------------------------------------------
# What is measured
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSpec:
    """The model and the per-rank batch of one measurement."""

    name: str
    model: MMDiTConfig
    latent: int  # side of the latent (model.in_channels channels)
    tokens: int  # text tokens
    batch: int  # per rank


def sd3_medium(depth: int) -> BenchSpec:
    """SD3-medium's width (1536, 24 heads, 4096-wide text, 2048-wide pooled vector) with `depth` joint blocks.

    Depth 2 (159M parameters) is what 4 DDP ranks fit in this machine's ~20 GB: each holds ~16 bytes of fp32 state
    per parameter, ~20 with DDP's gradient buckets, plus the replicated buffers and the framework; depth 3 (244M)
    would need ~22 GB (README, "FSDP: memory per rank")."""
    return BenchSpec(f"sd3-medium-d{depth}", MMDiTConfig(preset="sd3-medium", depth=depth), 16, 16, 2)


TINY = BenchSpec("tiny", MMDiTConfig(preset="tiny", depth=2), 8, 8, 2)
"""The quick mode's model (the test builds its own, with a parameter whose rows do not split evenly)."""


def _bytes(tensors: list[torch.Tensor]) -> dict[str, int]:
    """{"local": bytes of the tensors' local elements, "held": bytes of the distinct storages they live in}."""
    local_ = [local(t) for t in tensors]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in local_}
    return {"local": sum(t.numel() * t.element_size() for t in local_), "held": sum(storages.values())}


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, int]]:
    """Bytes this rank holds of parameters, gradients and optimizer state (local shards of DTensors)."""
    params = list(model.parameters())
    opt_state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {
        "params": _bytes(params),
        "grads": _bytes([p.grad for p in params if p.grad is not None]),
        "optimizer": _bytes(opt_state),
    }


# ---------------------------------------------------------------------------------------------------------------
# One rank
# ---------------------------------------------------------------------------------------------------------------


def _init_group(rank: int, world: int, port: int, backend: str = "gloo") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))


def _build(spec: BenchSpec, strategy: str, dev: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same weights on every rank and under both strategies
    if strategy == "fsdp":  # as the trainer builds it: in shards, rank 0 alone holding a whole copy (on CPU)
        net = build_sharded(lambda: MMDiT(spec.model), dev, "fp32", dist.get_rank())
    else:
        net = wrap_ddp(MMDiT(spec.model).to(dev), dev)
    return net, make_adam(list(net.parameters()), dev, adamw=True, lr=1e-4)


def _batch(spec: BenchSpec, rank: int, dev: torch.device) -> tuple[torch.Tensor, ...]:
    """(x, t, context, pooled, target): rank r's rows, the same under both strategies."""
    g = torch.Generator().manual_seed(1000 + rank)
    cfg, b = spec.model, spec.batch
    x = torch.randn(b, cfg.in_channels, spec.latent, spec.latent, generator=g)
    t = torch.rand(b, generator=g) * 1000
    ctx = torch.randn(b, spec.tokens, cfg.context_dim, generator=g)
    pooled = torch.randn(b, cfg.pooled_dim, generator=g)
    target = torch.randn(x.shape, generator=g)
    return tuple(v.to(dev) for v in (x, t, ctx, pooled, target))


def _step(net: nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...]) -> float:
    x, t, ctx, pooled, target = batch
    loss = (net(x, t, ctx, None, pooled).float() - target).square().mean()
    loss.backward()
    opt.step()
    return loss.item()


def _memory_rank(rank: int, world: int, port: int, spec: BenchSpec, strategy: str, queue) -> None:
    torch.set_num_threads(1)  # N ranks share the cores
    _init_group(rank, world, port)
    dev = torch.device("cpu")
    try:
        net, opt = _build(spec, strategy, dev)
        _step(net, opt, _batch(spec, rank, dev))
        counts = state_bytes(net, opt)  # after the AdamW step, before zero_grad: everything a step holds
        queue.put({"rank": rank, **counts, "peak_rss": peak_rss_bytes()})
    finally:
        dist.destroy_process_group()


def _timing_rank(rank: int, world: int, port: int, spec: BenchSpec, rounds: int, steps: int, queue) -> None:
    torch.set_num_threads(1)
    _init_group(rank, world, port)
    dev = torch.device("cpu")
    try:
        sides = {s: _build(spec, s, dev) for s in ("ddp", "fsdp")}
        batch = _batch(spec, rank, dev)

        def one_step(side: str) -> float:
            net, opt = sides[side]
            t0 = time.perf_counter()
            _step(net, opt, batch)
            opt.zero_grad(set_to_none=True)
            dist.barrier()  # a step ends when the slowest rank's does
            return time.perf_counter() - t0

        for side in sides:  # warmup: allocate the optimizer state, warm the allocator and gloo's buffers
            for _ in range(2):
                one_step(side)
        medians: dict[str, list[float]] = {s: [] for s in sides}
        order = list(sides)
        for r in range(rounds):
            for side in order[r % 2 :] + order[: r % 2]:  # each round starts with the other side
                one_step(side)  # a warmup step after the switch
                medians[side].append(statistics.median(one_step(side) for _ in range(steps)))
        if rank == 0:
            queue.put(medians)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Process groups
# ---------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args: Any, results: int) -> list[Any]:
    """`results` items that the `world` spawned ranks of fn(rank, world, port, *args, queue) put on the queue."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = torch.multiprocessing.start_processes(
        fn, args=(world, _free_port(), *args, queue), nprocs=world, join=False, start_method="spawn"
    )
    out = []
    while len(out) < results:
        if not queue.empty():
            out.append(queue.get())
        elif procs.join(timeout=0.5):  # all exited: whatever they did not put will never come
            break
    while not procs.join():
        pass
    if len(out) < results:
        raise RuntimeError(f"{fn.__name__}: {len(out)} of {results} results came back")
    return out


def measure_memory(spec: BenchSpec, strategy: str, world: int) -> list[dict]:
    """Per-rank byte counts after one training step (see `state_bytes`), rank order."""
    return sorted(_spawn(_memory_rank, world, spec, strategy, results=world), key=lambda r: r["rank"])


def measure_step_time(spec: BenchSpec, rounds: int, steps: int, world: int = 2) -> dict:
    medians = _spawn(_timing_rank, world, spec, rounds, steps, results=1)[0]
    return {
        "world": world,
        "rounds": rounds,
        "steps_per_round": steps,
        "ddp_s": statistics.median(medians["ddp"]),
        "fsdp_s": statistics.median(medians["fsdp"]),
        "ratio_fsdp_over_ddp": statistics.median(f / d for f, d in zip(medians["fsdp"], medians["ddp"])),
        "rounds_s": medians,
    }


def full_model_bytes(spec: BenchSpec, world: int) -> dict[str, int]:
    """The unsharded model's parameter bytes, and one FSDP rank's padded shard of them (ceil(rows / N) rows of
    each parameter, as `fully_shard` pads dim 0): what `state_bytes` must find, computed from shapes alone."""
    with torch.device("meta"):
        net = MMDiT(spec.model)
    params = list(net.parameters())
    return {
        "numel": sum(p.numel() for p in params),
        "full": sum(p.numel() * p.element_size() for p in params),
        "padded_shard": sum(
            math.ceil(p.shape[0] / world) * (p[0].numel() if p.ndim else 1) * p.element_size() for p in params
        ),
        "count": len(params),
    }


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run(spec: BenchSpec, worlds: dict[str, list[int]], rounds: int, steps: int) -> dict:
    t0 = time.time()
    full = full_model_bytes(spec, 2)
    result: dict = {
        "benchmark": "fsdp",
        "machine": {**machine_info(), "threads": 1},
        "load_avg_before": os.getloadavg(),
        "model": spec.model.to_dict(),
        "spec": {k: v for k, v in asdict(spec).items() if k != "model"},
        "parameters": full["numel"],
        "param_mb_full": full["full"] / MB,
        "memory": [],
    }
    for strategy, ns in worlds.items():
        for n in ns:
            # ~20 B/param for DDP (params, grads, AdamW, DDP's buckets) plus ~1 GB of framework and buffers per rank
            need = n * (20 * full["numel"] + 2**30) if strategy == "ddp" else 0
            if need > 0.9 * _mem_available():
                result["memory"].append({"strategy": strategy, "world": n, "skipped": f"needs ~{need / 2**30:.0f} GB"})
                continue
            load = os.getloadavg()[0]
            ranks = measure_memory(spec, strategy, n)
            result["memory"].append({"strategy": strategy, "world": n, "ranks": ranks, "load_avg_1min_before": load})
            print(f"[{(time.time() - t0) / 60:4.1f} min] memory {strategy} N={n} measured", flush=True)
    load = os.getloadavg()[0]
    result["step_time"] = {**measure_step_time(spec, rounds, steps), "load_avg_1min_before": load}
    result["load_avg_after"] = os.getloadavg()
    result["seconds"] = time.time() - t0
    return result


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def per_rank_state(ranks: list[dict], kind: str = "held") -> int:
    """The largest rank's parameters + gradients + optimizer state."""
    return max(r["params"][kind] + r["grads"][kind] + r["optimizer"][kind] for r in ranks)


def table_rows(result: dict) -> list[dict[str, str]]:
    measured = [m for m in result["memory"] if "ranks" in m]
    ddp = {m["world"]: per_rank_state(m["ranks"]) for m in measured if m["strategy"] == "ddp"}
    rows = []
    for m in result["memory"]:
        if "skipped" in m:
            rows.append({"strategy": m["strategy"].upper(), "N": str(m["world"]), "note": f"skipped: {m['skipped']}"})
            continue
        ranks, n = m["ranks"], m["world"]
        state = per_rank_state(ranks)
        ref = ddp.get(n) or next(iter(ddp.values()), None)  # DDP's per-rank state does not depend on N
        ratio = state / ref if ref else None
        goal = m["strategy"] == "fsdp" and ratio is not None
        rows.append(
            {
                "strategy": m["strategy"].upper(),
                "N": str(n),
                "params MB/rank": f"{max(r['params']['held'] for r in ranks) / MB:.1f}",
                "grads MB/rank": f"{max(r['grads']['held'] for r in ranks) / MB:.1f}",
                "AdamW state MB/rank": f"{max(r['optimizer']['held'] for r in ranks) / MB:.1f}",
                "state MB/rank": f"{state / MB:.1f}",
                "÷ DDP's": f"{ratio:.3f}" if ratio is not None else "",
                "goal 1/N ± 10%": (
                    f"{1 / n:.3f}: {'met' if abs(ratio * n - 1) <= GOAL_TOLERANCE else 'missed'}" if goal else ""
                ),
                "peak RSS MB/rank (process)": "–".join(
                    f"{v / MB:.0f}"
                    for v in sorted({min(r["peak_rss"] for r in ranks), max(r["peak_rss"] for r in ranks)})
                ),
                "note": "",
            }
        )
    return rows


COLUMNS = [
    "strategy",
    "N",
    "params MB/rank",
    "grads MB/rank",
    "AdamW state MB/rank",
    "state MB/rank",
    "÷ DDP's",
    "goal 1/N ± 10%",
    "peak RSS MB/rank (process)",
    "note",
]


def _phase_loads(result: dict) -> str:
    """The 1-minute load average at the start of each measurement (it includes the previous one's own ranks)."""
    loads = [m["load_avg_1min_before"] for m in result["memory"] if "load_avg_1min_before" in m]
    loads += [result["step_time"]["load_avg_1min_before"]] if "load_avg_1min_before" in result["step_time"] else []
    return f", before each measurement {', '.join(f'{v:.1f}' for v in loads)}" if loads else ""


def markdown(result: dict) -> str:
    m, st = result["machine"], result["step_time"]
    lines = [
        f"{result['spec']['name']} ({result['parameters'] / 1e6:.0f}M parameters, {result['param_mb_full']:.0f} MB "
        f"fp32), {result['spec']['latent']}x{result['spec']['latent']}x{result['model']['in_channels']} latents, "
        f"{result['spec']['tokens']} tokens, batch {result['spec']['batch']} per rank; gloo on loopback, 1 thread per "
        f"rank; {m['cpu']}, {m['cores']} cores, torch {m['torch']}; load average before "
        f"{result['load_avg_before'][0]:.2f}{_phase_loads(result)}; the run took {result['seconds'] / 60:.0f} min.",
        "",
        "| " + " | ".join(COLUMNS[:-1]) + " |",
        "|" + "---|" * (len(COLUMNS) - 1),
    ]
    for r in table_rows(result):
        if r.get("note"):
            lines.append(f"| {r['strategy']} | {r['N']} | {r['note']} |" + " |" * (len(COLUMNS) - 4))
        else:
            lines.append("| " + " | ".join(r[c] for c in COLUMNS[:-1]) + " |")
    lines += [
        "",
        f"Step time at N={st['world']} (forward, backward, fused AdamW; median of {st['steps_per_round']} steps in "
        f"each of {st['rounds']} alternating rounds): DDP {st['ddp_s']:.2f} s, FSDP {st['fsdp_s']:.2f} s; FSDP ÷ DDP "
        f"**{st['ratio_fsdp_over_ddp']:.2f}×** (median of the rounds' ratios).",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The GPU check's smoke run (under torchrun)
# ---------------------------------------------------------------------------------------------------------------


def smoke(device: str, precision: str, steps: int, json_path: str | None, preset: str = "dit-b") -> int:
    """A few AdamW steps of a sharded 4-block MMDiT (an `MMDIT_PRESETS` width) on one fixed batch under the process
    group torchrun describes; 0 when the loss went down."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dev = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        cfg = MMDiTConfig(preset=preset, depth=4)
        spec = BenchSpec("smoke", cfg, min(16, cfg.sample_size), 16, 4)
        torch.manual_seed(0)
        net = MMDiT(cfg).to(dev)
        with torch.no_grad():  # adaLN-Zero starts every block as the identity: give the blocks something to learn
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        net = shard_model(net, precision)
        opt = make_adam(list(net.parameters()), dev, adamw=True, lr=3e-4)
        batch = _batch(spec, dist.get_rank(), dev)
        losses = []
        for i in range(steps):
            losses.append(_step(net, opt, batch))
            opt.zero_grad(set_to_none=True)
            print(f"step {i}: loss {losses[-1]:.5f}", flush=True)
        ok = losses[-1] < losses[0]
        print(
            f"FSDP smoke ({preset} x4 blocks, {dist.get_world_size()} process, {dist.get_backend()}, {device}, "
            f"{precision}): loss "
            f"{losses[0]:.4f} -> {losses[-1]:.4f}: {'decreasing' if ok else 'NOT decreasing'}",
            flush=True,
        )
        if dist.get_rank() == 0:
            write_json(
                {"device": str(dev), "precision": precision, "preset": preset, "losses": losses, "decreasing": ok},
                json_path,
            )
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict | int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["smoke"]:
        p = argparse.ArgumentParser(prog="benchmarks.fsdp smoke")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
        p.add_argument("--steps", type=int, default=8)
        p.add_argument("--preset", choices=list(MMDIT_PRESETS), default="dit-b", help="the width (4 joint blocks)")
        p.add_argument("--json", default=None)
        a = p.parse_args(argv[1:])
        return smoke(a.device, a.precision, a.steps, a.json, a.preset)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny MMDiT, N=2 only, 2 short rounds (a smoke run)")
    p.add_argument("--depth", type=int, default=2, help="joint blocks of the SD3-medium-wide model")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and side")
    p.add_argument(
        "--json",
        default=None,
        help="default benchmarks/results/fsdp.json (the README block); --quick: benchmarks/results/fsdp-quick.json",
    )
    p.add_argument("--render", metavar="JSON", help="print the markdown of an earlier run's JSON; measure nothing")
    a = p.parse_args(argv)
    if a.render:
        result = json.loads(Path(a.render).read_text())
        print(markdown(result))
        return result
    if a.quick:
        result = run(TINY, {"ddp": [2], "fsdp": [2]}, rounds=2, steps=2)
    else:
        result = run(sd3_medium(a.depth), {"ddp": [2, 4], "fsdp": [2, 4]}, a.rounds, a.steps)
    result["quick"] = a.quick
    # a smoke run never overwrites the JSON the README is rendered from
    write_json(result, a.json or f"benchmarks/results/fsdp{'-quick' if a.quick else ''}.json")
    print_table(table_rows(result), COLUMNS)
    print()
    print(markdown(result))
    return result


if __name__ == "__main__":
    rc = main()
    sys.exit(rc if isinstance(rc, int) else 0)
