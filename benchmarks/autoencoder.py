"""Our AutoencoderKL vs diffusers' AutoencoderKL: forward+backward images/s at an identical config and weights.

    python -m benchmarks.autoencoder [--size 64 --batch 4 --json out.json]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import machine_info, print_table, time_alternating, write_json
from ldm_core.interop import to_diffusers
from ldm_core.models.autoencoder import AutoencoderConfig, AutoencoderKL

# Mid-size config: the kl-f8 layout (4 levels, 2 res blocks, mid attention) at half width, so that one
# forward+backward fits a 2-core CPU in well under a second.
BENCH_CONFIG = AutoencoderConfig(ch=64, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4, norm_groups=32)


def run(size: int = 64, batch: int = 4, rounds: int = 10, iters: int = 1, precision: str = "fp32",
        device: str = "cpu", channels_last: bool = False) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    ours = AutoencoderKL(BENCH_CONFIG).to(dev).train()
    theirs = to_diffusers(ours).to(dev).train()  # identical weights
    x = torch.randn(batch, 3, size, size, device=dev)
    x_ours = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    if channels_last:
        ours = ours.to(memory_format=torch.channels_last)
    gen = torch.Generator(device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else torch.autocast(dev.type, enabled=False)

    def step_ours():
        gen.manual_seed(0)
        with amp:
            out = ours(x_ours, sample_posterior=True, generator=gen)
            loss = out.reconstruction.float().abs().mean() + 1e-6 * out.reg_loss
        loss.backward()
        ours.zero_grad(set_to_none=True)

    def step_theirs():
        gen.manual_seed(0)
        with amp:
            post = theirs.encode(x).latent_dist
            rec = theirs.decode(post.sample(generator=gen)).sample
            loss = rec.float().abs().mean() + 1e-6 * post.kl().mean()
        loss.backward()
        theirs.zero_grad(set_to_none=True)

    t = time_alternating({"ours": step_ours, "diffusers": step_theirs}, rounds=rounds, iters=iters, warmup=1, device=dev)
    result = {
        "benchmark": "autoencoder_fwd_bwd", "config": BENCH_CONFIG.to_dict(), "image_size": size, "batch": batch,
        "precision": precision, "channels_last": channels_last, "machine": machine_info(),
        "ours_images_per_s": batch / t["ours"], "diffusers_images_per_s": batch / t["diffusers"],
        "ratio": t["ratio"],
    }
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    r = run(a.size, a.batch, a.rounds, a.iters, a.precision, a.device, a.channels_last)
    m = r["machine"]
    print(f"machine: {m['cpu']} | {m['threads']} threads | torch {m['torch']} | device {m['device']}")
    print_table([{
        "benchmark": f"AutoencoderKL fwd+bwd {a.size}px b{a.batch} {a.precision}",
        "ours img/s": f"{r['ours_images_per_s']:.2f}", "diffusers img/s": f"{r['diffusers_images_per_s']:.2f}",
        "ratio": f"{r['ratio']:.2f}x",
    }], ["benchmark", "ours img/s", "diffusers img/s", "ratio"])
    write_json(r, a.json)
    return r


if __name__ == "__main__":
    main()
