"""Our UNet vs diffusers' UNet2DConditionModel at an identical config and identical weights, in one run:
training step images/s (forward + backward + AdamW) and DDIM-50 sampling images/s with classifier-free guidance.

    python -m benchmarks.unet [--config demo|mid] [--json out.json]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import machine_info, print_table, time_alternating, write_json
from ldm_core.diffusion import DiffusionConfig, create_diffusion
from ldm_core.diffusion.guidance import cfg_model
from ldm_core.interop import to_diffusers
from ldm_core.models.unet import UNET_PRESETS, UNet, UNetConfig
from ldm_core.trainers.common import make_adam

CONFIGS = {
    # the demo's denoiser: 8×8×4 latents, MiniLM tokens
    "demo": dict(unet=UNET_PRESETS["tiny"], latent=8, tokens=16, batch=32, sample_batch=8),
    # a mid-size SD-1 layout (4 levels, attention at 3) at reduced width, 32×32×4 latents, CLIP-width tokens
    "mid": dict(unet=UNetConfig(model_channels=64, channel_mult=[1, 2, 4, 4], num_res_blocks=2, attention_levels=[0, 1, 2],
                                num_heads=8, context_dim=768, norm_groups=32),
                latent=32, tokens=77, batch=4, sample_batch=1),
}


def run(name: str, rounds: int = 5, iters: int = 2, sample_steps: int = 50, device: str = "cpu",
        precision: str = "fp32") -> dict:
    spec = CONFIGS[name]
    dev = torch.device(device)
    torch.manual_seed(0)
    ours = UNet(spec["unet"]).to(dev)
    theirs = to_diffusers(ours).to(dev)  # identical weights
    b, L, D, s = spec["batch"], spec["tokens"], spec["unet"].context_dim, spec["latent"]
    x = torch.randn(b, spec["unet"].in_channels, s, s, device=dev)
    t = torch.randint(0, 1000, (b,), device=dev).float()
    ctx = torch.randn(b, L, D, device=dev)
    mask = torch.ones(b, L, dtype=torch.bool, device=dev)
    target = torch.randn_like(x)
    # each side's optimizer as it ships: ours is what train_ldm builds (fused AdamW), diffusers' training scripts
    # build torch.optim.AdamW with its defaults
    opt_o = make_adam(list(ours.parameters()), dev, adamw=True, lr=1e-4)
    opt_t = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" else (lambda: torch.autocast(dev.type, enabled=False))

    def train_ours():
        with amp():
            loss = (ours(x, t, ctx, mask).float() - target).pow(2).mean()
        loss.backward()
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)

    def train_theirs():
        with amp():
            loss = (theirs(x, t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample.float() - target).pow(2).mean()
        loss.backward()
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)

    train = time_alternating({"ours": train_ours, "diffusers": train_theirs}, rounds=rounds, iters=iters, warmup=1, device=dev)

    # DDIM-50 with guidance 7.5: cond and uncond in one batched forward, for both models
    diffusion = create_diffusion(DiffusionConfig(kind="ddpm", sampler="ddim", sample_steps=sample_steps))
    sb = spec["sample_batch"]
    noise = torch.randn(sb, spec["unet"].in_channels, s, s, device=dev)
    c, u = ctx[:1].expand(sb, L, D), torch.zeros(1, L, D, device=dev)
    m1 = torch.ones(1, L, dtype=torch.bool, device=dev)
    theirs_fn = lambda xx, tt, cc, mm: theirs(xx, tt, encoder_hidden_states=cc, encoder_attention_mask=mm).sample  # noqa: E731
    ours.eval(), theirs.eval()

    def sample(model):
        def fn():
            with torch.inference_mode(), amp():
                diffusion.sample(cfg_model(model, c, mask[:sb], u, m1, 7.5), noise.clone())
        return fn

    samp = time_alternating({"ours": sample(ours), "diffusers": sample(theirs_fn)}, rounds=max(2, rounds // 2),
                            iters=1, warmup=1, device=dev)
    return {
        "benchmark": "unet", "config": name, "unet": spec["unet"].to_dict(), "latent": s, "tokens": L, "batch": b,
        "precision": precision, "machine": machine_info(),
        "train_ours_images_per_s": b / train["ours"], "train_diffusers_images_per_s": b / train["diffusers"],
        "train_ratio": train["ratio"],
        "sample_steps": sample_steps, "sample_batch": sb,
        "sample_ours_images_per_s": sb / samp["ours"], "sample_diffusers_images_per_s": sb / samp["diffusers"],
        "sample_ratio": samp["ratio"],
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
    a = p.parse_args(argv)
    names = list(CONFIGS) if a.config == "all" else [a.config]
    results = [run(n, a.rounds, a.iters, a.sample_steps, a.device, a.precision) for n in names]
    m = results[0]["machine"]
    print(f"machine: {m['cpu']} | {m['threads']} threads | torch {m['torch']} | diffusers {m.get('diffusers')} | device {m['device']}")
    rows = []
    for r in results:
        rows.append({"benchmark": f"UNet train step ({r['config']}, b{r['batch']}, {r['precision']})",
                     "ours img/s": f"{r['train_ours_images_per_s']:.2f}", "diffusers img/s": f"{r['train_diffusers_images_per_s']:.2f}",
                     "ratio": f"{r['train_ratio']:.2f}x"})
        rows.append({"benchmark": f"DDIM-{r['sample_steps']} + CFG ({r['config']}, b{r['sample_batch']})",
                     "ours img/s": f"{r['sample_ours_images_per_s']:.3f}", "diffusers img/s": f"{r['sample_diffusers_images_per_s']:.3f}",
                     "ratio": f"{r['sample_ratio']:.2f}x"})
    print_table(rows, ["benchmark", "ours img/s", "diffusers img/s", "ratio"])
    write_json({"results": results}, a.json)
    return results


if __name__ == "__main__":
    main()
