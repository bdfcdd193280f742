"""Peak memory of a training step, ours vs diffusers, and what gradient checkpointing saves and costs.

    python -m benchmarks.memory [--rounds 3] [--threads N] [--json out.json]

Both sides with gradient checkpointing off and on (ours: the config's ``gradient_checkpointing``; diffusers':
``enable_gradient_checkpointing()``, what its training scripts' ``--gradient_checkpointing`` does).

Each memory measurement runs in a fresh process (so no allocation of another lingers), at the requested thread
count: it builds the model, its inputs and the fused Adam(W) optimizer, takes a first step (which allocates the
optimizer state), then resets the process's resident-memory high-water mark and takes one more. "Step memory" is the
new high-water mark minus the memory held before that step (weights, inputs, optimizer state): activations and
gradients, what gradient checkpointing acts on. On a GPU it is `torch.cuda.max_memory_allocated` minus the
allocation before the step. (`ru_maxrss` cannot be used:
Linux carries a process's peak across fork and exec, so every child of a large parent reports the parent's size; it
did, 2.8 GB for every row, in this benchmark's first full run.)

What checkpointing costs in time is measured in this process instead, not from a step or two in separate processes:
per model, ours off / ours on / diffusers off / diffusers on at identical weights, timed in the same alternating
rounds (`benchmarks.common.time_alternating`); each side's slowdown is the median over rounds of on ÷ off.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import SD3Transformer2DModel, UNet2DConditionModel

from benchmarks import autoencoder as ae_bench
from benchmarks import mmdit as mmdit_bench
from benchmarks import unet as unet_bench
from benchmarks.common import (
    THREADS_HELP,
    in_fresh_process,
    machine_info,
    peak_rss_bytes,
    print_table,
    reset_peak_rss,
    round_ratio,
    rss_bytes,
    set_threads,
    time_alternating,
    write_json,
)
from ldm_core.interop import to_diffusers
from ldm_core.interop.autoencoder import diffusers_kwargs as ae_kwargs
from ldm_core.interop.mmdit import diffusers_kwargs as mmdit_kwargs
from ldm_core.interop.unet import diffusers_kwargs as unet_kwargs
from ldm_core.models.autoencoder import AutoencoderKL
from ldm_core.models.mmdit import MMDiT
from ldm_core.models.unet import UNet
from ldm_core.trainers.step import make_adam

MODELS = ("unet-mid", "mmdit-mid", "autoencoder-64px")
SIDES = ("ours", "diffusers")
CASES = [(m, side, ckpt) for m in MODELS for ckpt in (False, True) for side in SIDES]  # (model, side, checkpointing)


def _checkpointed(net: torch.nn.Module, on: bool) -> torch.nn.Module:
    """A diffusers model with its own gradient checkpointing on (what its training scripts'
    ``--gradient_checkpointing`` does) or off."""
    if on:
        net.enable_gradient_checkpointing()
    return net


def _build(model: str, side: str, checkpointed: bool, dev: torch.device):
    """(module, a function computing the loss) at the benchmark configs of benchmarks.unet / mmdit / autoencoder."""
    torch.manual_seed(0)
    if model.startswith("unet-"):  # unet-mid (the rows), unet-demo (a small case for the tests)
        spec = unet_bench.CONFIGS[model.removeprefix("unet-")]
        cfg = spec["unet"].model_copy(update={"gradient_checkpointing": checkpointed})
        b, L, s = spec["batch"], spec["tokens"], spec["latent"]
        x, ctx = torch.randn(b, 4, s, s, device=dev), torch.randn(b, L, cfg.context_dim, device=dev)
        t = torch.rand(b, device=dev) * 1000
        if side == "ours":
            net = UNet(cfg).to(dev)
            return net, lambda: net(x, t, ctx).square().mean()
        net = _checkpointed(UNet2DConditionModel(**unet_kwargs(cfg)).to(dev), checkpointed)
        return net, lambda: net(x, t, encoder_hidden_states=ctx).sample.square().mean()
    if model == "mmdit-mid":
        spec = mmdit_bench.CONFIGS["mid"]
        cfg = spec["mmdit"].model_copy(update={"gradient_checkpointing": checkpointed})
        b, L, s = spec["batch"], spec["tokens"], spec["latent"]
        x, ctx = torch.randn(b, cfg.in_channels, s, s, device=dev), torch.randn(b, L, cfg.context_dim, device=dev)
        pooled, t = torch.randn(b, cfg.pooled_projection_dim, device=dev), torch.rand(b, device=dev) * 1000
        if side == "ours":
            net = MMDiT(cfg).to(dev)
            return net, lambda: net(x, t, ctx, None, pooled).square().mean()
        net = _checkpointed(SD3Transformer2DModel(**mmdit_kwargs(cfg)).to(dev), checkpointed)
        return net, lambda: net(x, ctx, pooled, t).sample.square().mean()
    cfg = ae_bench.BENCH_CONFIG.model_copy(update={"gradient_checkpointing": checkpointed})
    x = torch.randn(4, 3, 64, 64, device=dev)
    if side == "ours":
        net = AutoencoderKL(cfg).to(dev)
        return net, lambda: net(x, sample_posterior=False).reconstruction.abs().mean()
    net = _checkpointed(DiffusersAutoencoderKL(**ae_kwargs(cfg)).to(dev), checkpointed)
    return net, lambda: net.decode(net.encode(x).latent_dist.mode()).sample.abs().mean()


def step_peak_bytes(step: Callable[[], None]) -> int:
    """Peak resident memory that `step()` adds to what the process holds when it is called (CPU)."""
    before = rss_bytes()
    reset_peak_rss()
    step()
    return max(0, peak_rss_bytes() - before)


def step_memory(step: Callable[[], None], dev: torch.device) -> tuple[int, int]:
    """(bytes `step()` adds at its peak to what the process holds, the peak itself): the CUDA allocator's on a GPU,
    resident memory on the CPU."""
    if dev.type != "cuda":
        return step_peak_bytes(step), peak_rss_bytes()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak - before, peak


def _train_step(net: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], dev: torch.device) -> Callable[[], None]:
    """Loss, backward and the fused AdamW step (the optimizer our trainer builds), on both sides."""
    opt = make_adam(list(net.parameters()), dev, adamw=True, lr=1e-4)

    def step() -> None:
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _measure(model: str, side: str, checkpointed: bool, device: str, threads: int | None, queue) -> None:
    set_threads(threads)  # torch's thread count is per process: the parent's setting does not reach a spawned child
    dev = torch.device(device)
    step = _train_step(*_build(model, side, checkpointed, dev), dev)
    step()  # the first step allocates the optimizer state, held from then on: measure a step of steady training
    step_bytes, _ = step_memory(step, dev)
    queue.put(
        {
            "model": model,
            "side": side,
            "checkpointing": checkpointed,
            "step_mb": step_bytes / 2**20,
            "threads": torch.get_num_threads(),
        }
    )


def measure(model: str, side: str, checkpointed: bool, device: str = "cpu", threads: int | None = None) -> dict:
    """One case's step memory, in a fresh process running `threads` intra-op threads (None: torch's default)."""
    return in_fresh_process(_measure, model, side, checkpointed, device, threads)


def checkpointing_cost(model: str, rounds: int = 3, device: str = "cpu") -> dict[str, dict[str, float]]:
    """What checkpointing costs in time, in this process: ours off / ours on / diffusers off / diffusers on timed in
    the same alternating rounds at identical weights. Per side: the median s/step with it off and on, and
    ``slowdown``, the median over rounds of on ÷ off."""
    dev = torch.device(device)
    fns = {}
    for side in SIDES:
        for on in (False, True):
            net, loss_fn = _build(model, side, on, dev)
            if side == "diffusers":  # the weights of ours (_build seeds the same init for ours, off and on)
                net.load_state_dict(to_diffusers(_build(model, "ours", False, dev)[0]).state_dict())
            fns[(side, on)] = _train_step(net, loss_fn, dev)
    named = {f"{side} {'on' if on else 'off'}": fn for (side, on), fn in fns.items()}
    t = time_alternating(named, rounds=rounds, iters=1, warmup=1, device=dev)
    return {
        side: {
            "off_s": t[f"{side} off"],
            "on_s": t[f"{side} on"],
            "slowdown": round_ratio(t["samples"], f"{side} on", f"{side} off"),
        }
        for side in SIDES
    }


def run(device: str = "cpu", rounds: int = 3, threads: int | None = None) -> dict:
    """Step memory of every case (each in a fresh process, at `threads` threads) and, per model, checkpointing's
    time cost from alternated rounds in this process (each row's ``step_s``; ``slowdown`` on the rows with it on)."""
    set_threads(threads)
    rows = [measure(m, s, c, device, threads) for m, s, c in CASES]
    for model in MODELS:
        cost = checkpointing_cost(model, rounds, device)
        for r in rows:
            if r["model"] == model:
                c = cost[r["side"]]
                r["step_s"] = c["on_s"] if r["checkpointing"] else c["off_s"]
                r["slowdown"] = c["slowdown"] if r["checkpointing"] else None
    return {"benchmark": "memory", "machine": machine_info(), "device": device, "threads": threads, "rows": rows}


TABLE_COLUMNS = ["model", "side", "checkpointing", "step MB", "s/step (alternated)", "checkpointing time"]


def table_rows(rows: list[dict]) -> list[dict[str, str]]:
    """The printed table's rows (shared with the suite's printout)."""
    return [
        {
            "model": r["model"],
            "side": r["side"],
            "checkpointing": "on" if r["checkpointing"] else "off",
            "step MB": f"{r['step_mb']:.0f}",
            "s/step (alternated)": f"{r['step_s']:.2f}" if r.get("step_s") is not None else "",
            "checkpointing time": f"{r['slowdown']:.2f}x" if r.get("slowdown") is not None else "",
        }
        for r in rows
    ]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the checkpointing time cost")
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    a = p.parse_args(argv)
    result = run(a.device, a.rounds, a.threads)
    print_table(table_rows(result["rows"]), TABLE_COLUMNS)
    write_json(result, a.json)
    return result


if __name__ == "__main__":
    main()
