"""Peak memory of a training step, ours vs diffusers, and what gradient checkpointing saves and costs.

    python -m benchmarks.memory [--json out.json]

Each measurement runs in a fresh process (so no allocation of another lingers): it builds the model, its inputs and
the fused Adam(W) optimizer, takes a first step (which allocates the optimizer state), then resets the process's
resident-memory high-water mark and takes one more. "Step memory" is the new high-water mark minus the memory held
before that step (weights, inputs, optimizer state): activations and gradients, what gradient checkpointing acts on.
On a GPU it is `torch.cuda.max_memory_allocated` minus the allocation before the step. (`ru_maxrss` cannot be used:
Linux carries a process's peak across fork and exec, so every child of a large parent reports the parent's size; it
did, 2.8 GB for every row, in this benchmark's first full run.)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import SD3Transformer2DModel, UNet2DConditionModel

from benchmarks import autoencoder as ae_bench
from benchmarks import mmdit as mmdit_bench
from benchmarks import unet as unet_bench
from benchmarks.common import (
    in_fresh_process,
    machine_info,
    peak_rss_bytes,
    print_table,
    reset_peak_rss,
    rss_bytes,
    write_json,
)
from ldm_core.interop.autoencoder import diffusers_kwargs as ae_kwargs
from ldm_core.interop.mmdit import diffusers_kwargs as mmdit_kwargs
from ldm_core.interop.unet import diffusers_kwargs as unet_kwargs
from ldm_core.models.autoencoder import AutoencoderKL
from ldm_core.models.mmdit import MMDiT
from ldm_core.models.unet import UNet
from ldm_core.trainers.step import make_adam

CASES = [  # (model, side, gradient checkpointing)
    ("unet-mid", "ours", False),
    ("unet-mid", "diffusers", False),
    ("unet-mid", "ours", True),
    ("mmdit-mid", "ours", False),
    ("mmdit-mid", "diffusers", False),
    ("mmdit-mid", "ours", True),
    ("autoencoder-64px", "ours", False),
    ("autoencoder-64px", "diffusers", False),
    ("autoencoder-64px", "ours", True),
]


def _build(model: str, side: str, checkpointed: bool, dev: torch.device):
    """(module, a function computing the loss) at the benchmark configs of benchmarks.unet / mmdit / autoencoder."""
    torch.manual_seed(0)
    if model == "unet-mid":
        spec = unet_bench.CONFIGS["mid"]
        cfg = spec["unet"].model_copy(update={"gradient_checkpointing": checkpointed})
        b, L, s = spec["batch"], spec["tokens"], spec["latent"]
        x, ctx = torch.randn(b, 4, s, s, device=dev), torch.randn(b, L, cfg.context_dim, device=dev)
        t = torch.rand(b, device=dev) * 1000
        if side == "ours":
            net = UNet(cfg).to(dev)
            return net, lambda: net(x, t, ctx).square().mean()
        net = UNet2DConditionModel(**unet_kwargs(cfg)).to(dev)
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
        net = SD3Transformer2DModel(**mmdit_kwargs(cfg)).to(dev)
        return net, lambda: net(x, ctx, pooled, t).sample.square().mean()
    cfg = ae_bench.BENCH_CONFIG.model_copy(update={"gradient_checkpointing": checkpointed})
    x = torch.randn(4, 3, 64, 64, device=dev)
    if side == "ours":
        net = AutoencoderKL(cfg).to(dev)
        return net, lambda: net(x, sample_posterior=False).reconstruction.abs().mean()
    net = DiffusersAutoencoderKL(**ae_kwargs(cfg)).to(dev)
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


def _measure(model: str, side: str, checkpointed: bool, device: str, steps: int, queue) -> None:
    dev = torch.device(device)
    net, loss_fn = _build(model, side, checkpointed, dev)
    opt = make_adam(list(net.parameters()), dev, adamw=True, lr=1e-4)

    def step() -> None:
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the first step allocates the optimizer state, held from then on: measure a step of steady training
    step_bytes, _ = step_memory(step, dev)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    queue.put(
        {
            "model": model,
            "side": side,
            "checkpointing": checkpointed,
            "step_mb": step_bytes / 2**20,
            "step_s": (time.perf_counter() - t) / steps,
        }
    )


def measure(model: str, side: str, checkpointed: bool, device: str = "cpu", steps: int = 2) -> dict:
    return in_fresh_process(_measure, model, side, checkpointed, device, steps)


def run(device: str = "cpu", steps: int = 2) -> dict:
    rows = [measure(m, s, c, device, steps) for m, s, c in CASES]
    return {"benchmark": "memory", "machine": machine_info(), "device": device, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    result = run(a.device, a.steps)
    print_table(
        [
            {
                "model": r["model"],
                "side": r["side"],
                "checkpointing": "on" if r["checkpointing"] else "off",
                "step MB": f"{r['step_mb']:.0f}",
                "s/step": f"{r['step_s']:.2f}",
            }
            for r in result["rows"]
        ],
        ["model", "side", "checkpointing", "step MB", "s/step"],
    )
    write_json(result, a.json)
    return result


if __name__ == "__main__":
    main()
