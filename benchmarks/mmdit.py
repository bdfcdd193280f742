"""Our MMDiT vs diffusers' SD3Transformer2DModel at an identical config and identical weights, in one run.

    python -m benchmarks.mmdit [--config tiny|mid|all] [--precision fp32|bf16] [--threads N] [--json out.json]

Like for like: the same fused AdamW step on both sides; each side's FLOPs counted on its own step (meta device).
Sampling: flow matching, Euler, 28 steps (SD3's default) with classifier-free guidance, cond and uncond batched.
The text is passed with its pooled vector on both sides (diffusers' SD3 transformer has no text mask: all tokens
are real here).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

import torch
from diffusers import SD3Transformer2DModel

from benchmarks.common import (
    THREADS_HELP,
    machine_info,
    print_table,
    ratio_row,
    set_threads,
    time_alternating,
    write_json,
)
from benchmarks.unet import autocast, train_step
from ldm_core.diffusion import DiffusionConfig, create_diffusion
from ldm_core.flops import count_flops
from ldm_core.interop import to_diffusers
from ldm_core.interop.mmdit import diffusers_kwargs
from ldm_core.models.mmdit import MMDIT_PRESETS, MMDiT, MMDiTConfig
from ldm_core.trainers.step import make_adam

CONFIGS = {
    # the demo's MMDiT: 8×8×4 latents, MiniLM tokens
    "tiny": dict(mmdit=MMDIT_PRESETS["tiny"], latent=8, tokens=16, batch=32, sample_batch=8),
    # a mid-size SD3 layout: 32×32×16 latents (256 tokens), 8 blocks of 384 channels, CLIP-width tokens
    "mid": dict(
        mmdit=MMDiTConfig(
            in_channels=16,
            out_channels=16,
            patch_size=2,
            hidden_size=384,
            depth=8,
            num_heads=6,
            context_dim=768,
            pooled_projection_dim=768,
            sample_size=32,
            pos_embed_max_size=32,
        ),
        latent=32,
        tokens=77,
        batch=4,
        sample_batch=1,
    ),
}
SAMPLE_STEPS = 28


def meta_flops(spec: dict) -> dict[str, dict[str, float]]:
    """Per-sample FLOPs of each side's own forward + backward ("train") and forward ("forward"), on the meta device."""
    cfg, b, L, s = spec["mmdit"], 2, spec["tokens"], spec["latent"]
    with torch.device("meta"):
        ours = MMDiT(cfg)
        theirs = SD3Transformer2DModel(**diffusers_kwargs(cfg))
        x = torch.empty(b, cfg.in_channels, s, s)
        t = torch.empty(b)
        ctx = torch.empty(b, L, cfg.context_dim)
        pooled = torch.empty(b, cfg.pooled_projection_dim or cfg.context_dim)
    fwd = {"ours": lambda: ours(x, t, ctx, None, pooled), "diffusers": lambda: theirs(x, ctx, pooled, t).sample}
    return {
        "train": {k: count_flops(lambda f=f: f().float().pow(2).mean().backward()) / b for k, f in fwd.items()},
        "forward": {k: count_flops(f) / b for k, f in fwd.items()},
    }


class Setup(NamedTuple):
    """Both MMDiTs with identical weights and one training batch of a config."""

    ours: MMDiT
    theirs: torch.nn.Module
    x: torch.Tensor
    t: torch.Tensor
    ctx: torch.Tensor
    pooled: torch.Tensor
    target: torch.Tensor

    def forward(self, side: str, module: Callable | None = None) -> Callable[[], torch.Tensor]:
        """The side's forward on the batch, through `module` (e.g. a copy of the side's model) or the side's model.
        The text is passed with its pooled vector on both sides; diffusers' SD3 transformer takes no text mask."""
        if side == "ours":
            m = self.ours if module is None else module
            return lambda: m(self.x, self.t, self.ctx, None, self.pooled)
        m = self.theirs if module is None else module
        return lambda: m(self.x, self.ctx, self.pooled, self.t).sample


def setup(name: str, dev: torch.device) -> Setup:
    spec = CONFIGS[name]
    cfg = spec["mmdit"]
    torch.manual_seed(0)
    ours = MMDiT(cfg).to(dev)
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: give the weights something to carry
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    theirs = to_diffusers(ours).to(dev)  # identical weights
    b, L, s = spec["batch"], spec["tokens"], spec["latent"]
    x = torch.randn(b, cfg.in_channels, s, s, device=dev)
    t = torch.rand(b, device=dev) * 1000
    ctx = torch.randn(b, L, cfg.context_dim, device=dev)
    pooled = torch.randn(b, cfg.pooled_projection_dim or cfg.context_dim, device=dev)
    return Setup(ours, theirs, x, t, ctx, pooled, torch.randn_like(x))


def _sampling(
    su: Setup, spec: dict, sample_steps: int, rounds: int, amp: Callable[[], torch.autocast], dev: torch.device
) -> dict:
    """Flow matching, Euler, with guidance 7, cond and uncond batched, for both models: time_alternating's result."""
    ours, theirs, ctx, pooled = su.ours, su.theirs, su.ctx, su.pooled
    cfg, L, s = spec["mmdit"], spec["tokens"], spec["latent"]
    diffusion = create_diffusion(DiffusionConfig(kind="flow", sample_steps=sample_steps))
    sb = spec["sample_batch"]
    noise = torch.randn(sb, cfg.in_channels, s, s, device=dev)
    both_ctx = torch.cat([ctx[:1].expand(sb, L, cfg.context_dim), torch.zeros(sb, L, cfg.context_dim, device=dev)])
    both_pooled = torch.cat([pooled[:1].expand(sb, -1), torch.zeros(sb, pooled.shape[1], device=dev)])
    ours.eval(), theirs.eval()

    def guided(call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scale: float = 7.0):
        def model(x_t, t_model, *_):
            tt = torch.as_tensor(t_model, dtype=torch.float32, device=dev).expand(sb).repeat(2)  # (2·sb,)
            cond, uncond = call(torch.cat([x_t, x_t]), tt).chunk(2)
            return uncond + scale * (cond - uncond)

        return model

    calls = {
        "ours": lambda xx, tt: ours(xx, tt, both_ctx, None, both_pooled),
        "diffusers": lambda xx, tt: theirs(xx, both_ctx, both_pooled, tt).sample,
    }

    def sample(call) -> Callable[[], None]:
        def fn() -> None:
            with torch.inference_mode(), amp():
                diffusion.sample(guided(call), noise.clone())

        return fn

    return time_alternating({k: sample(c) for k, c in calls.items()}, rounds=rounds, iters=1, warmup=1, device=dev)


def run(
    name: str,
    rounds: int = 5,
    iters: int = 2,
    sample_steps: int = SAMPLE_STEPS,
    device: str = "cpu",
    precision: str = "fp32",
) -> dict:
    spec = CONFIGS[name]
    cfg = spec["mmdit"]
    dev = torch.device(device)
    su = setup(name, dev)
    ours, theirs, target = su.ours, su.theirs, su.target
    b, L, s, sb = spec["batch"], spec["tokens"], spec["latent"], spec["sample_batch"]
    amp = autocast(dev, precision)
    f_ours, f_theirs = su.forward("ours"), su.forward("diffusers")

    opts = {
        "ours": make_adam(list(ours.parameters()), dev, adamw=True, lr=1e-4),
        "diffusers": make_adam(list(theirs.parameters()), dev, adamw=True, lr=1e-4),
    }
    train = time_alternating(
        {
            "ours": train_step(f_ours, target, opts["ours"], amp),
            "diffusers": train_step(f_theirs, target, opts["diffusers"], amp),
        },
        rounds=rounds,
        iters=iters,
        warmup=1,
        device=dev,
    )
    flops = meta_flops(spec)

    samp = _sampling(su, spec, sample_steps, max(2, rounds // 2), amp, dev)
    return {
        "benchmark": "mmdit",
        "config": name,
        "mmdit": cfg.to_dict(),
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
        "sample_steps": sample_steps,
        "sample_batch": sb,
        "sample_ours_images_per_s": sb / samp["ours"],
        "sample_diffusers_images_per_s": sb / samp["diffusers"],
        "sample_ratio": samp["ratio"],
        "sample_flops_ours": 2 * flops["forward"]["ours"] * sample_steps,
        "sample_flops_diffusers": 2 * flops["forward"]["diffusers"] * sample_steps,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--sample-steps", type=int, default=SAMPLE_STEPS)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    a = p.parse_args(argv)
    set_threads(a.threads)
    names = list(CONFIGS) if a.config == "all" else [a.config]
    results = [run(n, a.rounds, a.iters, a.sample_steps, a.device, a.precision) for n in names]
    rows = []
    for r in results:
        rows.append(
            ratio_row(
                f"MMDiT train step, same fused AdamW ({r['config']}, b{r['batch']}, {r['precision']})", r, "train", 2
            )
        )
        rows.append(
            ratio_row(f"flow Euler-{r['sample_steps']} + CFG ({r['config']}, b{r['sample_batch']})", r, "sample", 3)
        )
    print_table(rows, ["benchmark", "ours img/s", "diffusers img/s", "ratio"])
    write_json({"results": results}, a.json)
    return results


if __name__ == "__main__":
    main()
