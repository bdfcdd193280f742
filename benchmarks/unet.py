"""Our UNet vs diffusers' UNet2DConditionModel at an identical config and identical weights, in one run.

    python -m benchmarks.unet [--config demo|mid|all] [--precision fp32|bf16] [--threads N] [--json out.json]

Model rows (like for like): both sides take the same fused AdamW step (the optimizer our trainer builds) on the same
batch in the same memory format; each side's FLOPs are counted on its own step. The "as shipped" row pits our step
against diffusers' with the optimizer its training scripts build (torch.optim.AdamW with its defaults): that row
measures the product, not the model, and is labelled so.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

import torch

from benchmarks.common import (
    THREADS_HELP,
    machine_info,
    print_table,
    ratio_row,
    set_threads,
    time_alternating,
    write_json,
)
from ldm_core.diffusion import DiffusionConfig, create_diffusion
from ldm_core.diffusion.guidance import cfg_model
from ldm_core.flops import count_flops
from ldm_core.interop import to_diffusers
from ldm_core.interop.unet import diffusers_kwargs
from ldm_core.models.unet import UNET_PRESETS, UNet, UNetConfig
from ldm_core.trainers.step import make_adam

CONFIGS = {
    # the demo's denoiser: 8×8×4 latents, MiniLM tokens
    "demo": dict(unet=UNET_PRESETS["tiny"], latent=8, tokens=16, batch=32, sample_batch=8),
    # a mid-size SD-1 layout (4 levels, attention at 3) at reduced width, 32×32×4 latents, CLIP-width tokens
    "mid": dict(
        unet=UNetConfig(
            model_channels=64,
            channel_mult=[1, 2, 4, 4],
            num_res_blocks=2,
            attention_levels=[0, 1, 2],
            num_heads=8,
            context_dim=768,
            norm_groups=32,
        ),
        latent=32,
        tokens=77,
        batch=4,
        sample_batch=1,
    ),
}


def autocast(device: torch.device, precision: str) -> Callable[[], torch.autocast]:
    dtype = torch.bfloat16 if precision == "bf16" else None
    return lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_step(
    forward: Callable[[], torch.Tensor],
    target: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
    amp: Callable[[], torch.autocast],
) -> Callable[[], None]:
    """forward + MSE + backward (+ the optimizer step and zero_grad when given): one training step."""

    def step() -> None:
        with amp():
            loss = (forward().float() - target).pow(2).mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def diffusers_mask(mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The ``encoder_attention_mask`` keyword for diffusers' UNet: none where no token is padded. Its pipelines and
    train_text_to_image.py pass no mask, and a mask (even all ones) sends every cross-attention down diffusers'
    masked path; ours is given its mask and skips the masked path itself when nothing is padded."""
    return {} if mask is None or bool(mask.all()) else {"encoder_attention_mask": mask}


def meta_flops(spec: dict) -> dict[str, dict[str, float]]:
    """Per-image FLOPs of each side's own forward + backward ("train") and forward ("forward"), counted on the meta
    device (torch's flop counter misses CPU flash attention on real tensors; on meta it counts it). The optimizer's
    elementwise work is not counted."""
    from diffusers import UNet2DConditionModel

    cfg, b, L, s = spec["unet"], 2, spec["tokens"], spec["latent"]
    with torch.device("meta"):
        ours = UNet(cfg)
        theirs = UNet2DConditionModel(**diffusers_kwargs(cfg))
        x = torch.empty(b, cfg.in_channels, s, s)
        t = torch.empty(b)
        ctx = torch.empty(b, L, cfg.context_dim)
        mask = torch.ones(b, L, dtype=torch.bool)
    fwd = {  # each side's own real step: nothing is padded, so diffusers gets no mask (see `diffusers_mask`)
        "ours": lambda: ours(x, t, ctx, mask),
        "diffusers": lambda: theirs(x, t, encoder_hidden_states=ctx).sample,
    }
    return {
        "train": {k: count_flops(lambda f=f: f().float().pow(2).mean().backward()) / b for k, f in fwd.items()},
        "forward": {k: count_flops(f) / b for k, f in fwd.items()},
    }


class Setup(NamedTuple):
    """Both UNets with identical weights and one training batch of a config."""

    ours: UNet
    theirs: torch.nn.Module
    x: torch.Tensor
    t: torch.Tensor
    ctx: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor

    def forward(self, side: str, module: Callable | None = None) -> Callable[[], torch.Tensor]:
        """The side's forward on the batch, through `module` (e.g. its compiled wrapper) or the side's model."""
        if side == "ours":
            m = self.ours if module is None else module
            return lambda: m(self.x, self.t, self.ctx, self.mask)
        m = self.theirs if module is None else module
        kw = diffusers_mask(self.mask)
        return lambda: m(self.x, self.t, encoder_hidden_states=self.ctx, **kw).sample


def setup(name: str, dev: torch.device) -> Setup:
    spec = CONFIGS[name]
    torch.manual_seed(0)
    ours = UNet(spec["unet"]).to(dev)
    theirs = to_diffusers(ours).to(dev)  # identical weights
    b, L, D, s = spec["batch"], spec["tokens"], spec["unet"].context_dim, spec["latent"]
    x = torch.randn(b, spec["unet"].in_channels, s, s, device=dev)
    return Setup(
        ours,
        theirs,
        x,
        torch.randint(0, 1000, (b,), device=dev).float(),
        torch.randn(b, L, D, device=dev),
        torch.ones(b, L, dtype=torch.bool, device=dev),
        torch.randn_like(x),
    )


def _sampling(
    su: Setup, spec: dict, sample_steps: int, rounds: int, amp: Callable[[], torch.autocast], dev: torch.device
) -> dict:
    """DDIM with guidance 7.5, cond and uncond in one batched forward, for both models: time_alternating's result."""
    ours, theirs, ctx, mask = su.ours, su.theirs, su.ctx, su.mask
    L, D, s = spec["tokens"], spec["unet"].context_dim, spec["latent"]
    diffusion = create_diffusion(DiffusionConfig(kind="ddpm", sampler="ddim", sample_steps=sample_steps))
    sb = spec["sample_batch"]
    noise = torch.randn(sb, spec["unet"].in_channels, s, s, device=dev)
    c, u = ctx[:1].expand(sb, L, D), torch.zeros(1, L, D, device=dev)
    m1 = torch.ones(1, L, dtype=torch.bool, device=dev)
    padded = bool(not mask[:sb].all() or not m1.all())  # decided once: no sync inside the timed loop

    def theirs_fn(xx, tt, cc, mm, pooled=None):
        kw = {"encoder_attention_mask": mm} if padded else {}  # see `diffusers_mask`
        return theirs(xx, tt, encoder_hidden_states=cc, **kw).sample

    ours.eval(), theirs.eval()

    def sample(model) -> Callable[[], None]:
        def fn() -> None:
            with torch.inference_mode(), amp():
                diffusion.sample(cfg_model(model, c, mask[:sb], u, m1, 7.5), noise.clone())

        return fn

    return time_alternating(
        {"ours": sample(ours), "diffusers": sample(theirs_fn)}, rounds=rounds, iters=1, warmup=1, device=dev
    )


def run(
    name: str, rounds: int = 5, iters: int = 2, sample_steps: int = 50, device: str = "cpu", precision: str = "fp32"
) -> dict:
    spec = CONFIGS[name]
    dev = torch.device(device)
    su = setup(name, dev)
    ours, theirs, target = su.ours, su.theirs, su.target
    b, L, s, sb = spec["batch"], spec["tokens"], spec["latent"], spec["sample_batch"]
    amp = autocast(dev, precision)
    f_ours, f_theirs = su.forward("ours"), su.forward("diffusers")

    # 1) like for like: the same fused AdamW on both sides
    same = {
        "ours": make_adam(list(ours.parameters()), dev, adamw=True, lr=1e-4),
        "diffusers": make_adam(list(theirs.parameters()), dev, adamw=True, lr=1e-4),
    }
    steps = {
        "ours": train_step(f_ours, target, same["ours"], amp),
        "diffusers": train_step(f_theirs, target, same["diffusers"], amp),
    }
    train = time_alternating(steps, rounds=rounds, iters=iters, warmup=1, device=dev)
    flops = meta_flops(spec)

    # 2) as shipped: diffusers' training scripts build torch.optim.AdamW with its defaults
    shipped_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    shipped = time_alternating(
        {"ours": steps["ours"], "diffusers": train_step(f_theirs, target, shipped_opt, amp)},
        rounds=max(2, rounds // 2),
        iters=iters,
        warmup=1,
        device=dev,
    )

    samp = _sampling(su, spec, sample_steps, max(2, rounds // 2), amp, dev)  # 3) DDIM + CFG
    sample_flops = {side: 2 * f * sample_steps for side, f in flops["forward"].items()}  # cond + uncond per step
    return {
        "benchmark": "unet",
        "config": name,
        "unet": spec["unet"].to_dict(),
        "latent": s,
        "tokens": L,
        "batch": b,
        "precision": precision,
        "machine": machine_info(),
        "optimizer": "fused AdamW on both sides",
        "train_ours_images_per_s": b / train["ours"],
        "train_diffusers_images_per_s": b / train["diffusers"],
        "train_ratio": train["ratio"],
        "train_flops_ours": flops["train"]["ours"],
        "train_flops_diffusers": flops["train"]["diffusers"],
        "shipped_ours_images_per_s": b / shipped["ours"],
        "shipped_diffusers_images_per_s": b / shipped["diffusers"],
        "shipped_ratio": shipped["ratio"],
        "sample_steps": sample_steps,
        "sample_batch": sb,
        "sample_ours_images_per_s": sb / samp["ours"],
        "sample_diffusers_images_per_s": sb / samp["diffusers"],
        "sample_ratio": samp["ratio"],
        "sample_flops_ours": sample_flops["ours"],
        "sample_flops_diffusers": sample_flops["diffusers"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    a = p.parse_args(argv)
    set_threads(a.threads)
    names = list(CONFIGS) if a.config == "all" else [a.config]
    results = [run(n, a.rounds, a.iters, a.sample_steps, a.device, a.precision) for n in names]
    m = results[0]["machine"]
    print(
        f"machine: {m['cpu']} | {m['threads']} threads | torch {m['torch']} | diffusers {m.get('diffusers')} | "
        f"device {m['device']}"
    )
    rows = []
    for r in results:
        rows.append(
            ratio_row(
                f"UNet train step, same fused AdamW ({r['config']}, b{r['batch']}, {r['precision']})", r, "train", 2
            )
        )
        rows.append(ratio_row(f"DDIM-{r['sample_steps']} + CFG ({r['config']}, b{r['sample_batch']})", r, "sample", 3))
        rows.append(
            ratio_row(
                f"as shipped: our step vs diffusers + torch.optim.AdamW defaults ({r['config']})", r, "shipped", 2
            )
        )
    print_table(rows, ["benchmark", "ours img/s", "diffusers img/s", "ratio"])
    write_json({"results": results}, a.json)
    return results


if __name__ == "__main__":
    main()
