"""The benchmark suite: ours vs diffusers at identical configs and weights, side by side in one run.

    python -m benchmarks [--quick] [--precision fp32|bf16] [--json benchmarks/results/suite.json]

Rows: UNet training step (demo and mid-size configs), AutoencoderKL training step with the full loss (LPIPS +
discriminator), DDIM-50 sampling with classifier-free guidance, the latent loader against the UNet step's
consumption, and encoding throughput with its peak RSS. Every row is timed in alternating rounds inside this
process (the ratio is the median of the per-round ratios); FLOPs are counted with torch.utils.flop_counter and MFU
is relative to the dense matmul rate measured here, in the same run, in the same precision.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchmarks import autoencoder as ae_bench
from benchmarks import unet as unet_bench
from benchmarks.common import machine_info, print_table, write_json
from ldm_core.flops import count_flops, measure_matmul_peak, mfu


def unet_flops_per_image(name: str) -> float:
    """Training FLOPs (forward + backward) of one image through our UNet at the benchmark's config."""
    from ldm_core.models.unet import UNet

    spec = unet_bench.CONFIGS[name]
    model = UNet(spec["unet"])
    b, s, L = 2, spec["latent"], spec["tokens"]
    x = torch.randn(b, spec["unet"].in_channels, s, s)
    t = torch.rand(b) * 1000
    ctx = torch.randn(b, L, spec["unet"].context_dim)
    return count_flops(lambda: model(x, t, ctx).pow(2).mean().backward()) / b


def unet_sample_flops_per_image(name: str, steps: int) -> float:
    """FLOPs of one guided DDIM sample: `steps` forwards at batch 2 (cond + uncond) per image."""
    from ldm_core.models.unet import UNet

    spec = unet_bench.CONFIGS[name]
    model = UNet(spec["unet"]).eval()
    s, L = spec["latent"], spec["tokens"]
    x = torch.randn(2, spec["unet"].in_channels, s, s)
    with torch.no_grad():
        per_forward = count_flops(lambda: model(x, torch.full((2,), 500.0), torch.randn(2, L, spec["unet"].context_dim)))
    return per_forward * steps


def run(quick: bool, precision: str) -> dict:
    t0 = time.time()
    peak = measure_matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
    result: dict = {"machine": machine_info(), "precision": precision, "matmul_peak_flops": peak, "rows": []}
    rows = result["rows"]
    rounds = 3 if quick else 8
    sample_steps = 10 if quick else 50

    for name in ("demo", "mid"):
        r = unet_bench.run(name, rounds=rounds, iters=1, sample_steps=sample_steps, precision=precision)
        fl = unet_flops_per_image(name)
        sfl = unet_sample_flops_per_image(name, sample_steps)
        rows.append({"row": f"UNet train step ({name})", "ours": r["train_ours_images_per_s"],
                     "diffusers": r["train_diffusers_images_per_s"], "ratio": r["train_ratio"], "unit": "img/s",
                     "gflop_per_item": fl / 1e9, "mfu_ours": mfu(fl, r["train_ours_images_per_s"], peak),
                     "mfu_diffusers": mfu(fl, r["train_diffusers_images_per_s"], peak), "detail": r})
        rows.append({"row": f"DDIM-{sample_steps} + CFG ({name})", "ours": r["sample_ours_images_per_s"],
                     "diffusers": r["sample_diffusers_images_per_s"], "ratio": r["sample_ratio"], "unit": "img/s",
                     "gflop_per_item": sfl / 1e9, "mfu_ours": mfu(sfl, r["sample_ours_images_per_s"], peak),
                     "mfu_diffusers": mfu(sfl, r["sample_diffusers_images_per_s"], peak)})

    a = ae_bench.run_full_loss(size=32 if quick else 64, batch=4, rounds=rounds, precision=precision)
    rows.append({"row": f"AutoencoderKL train step, LPIPS+GAN ({a['image_size']}px)", "ours": a["ours_images_per_s"],
                 "diffusers": a["diffusers_images_per_s"], "ratio": a["ratio"], "unit": "img/s",
                 "gflop_per_item": a["flops_per_image"] / 1e9, "mfu_ours": mfu(a["flops_per_image"], a["ours_images_per_s"], peak),
                 "mfu_diffusers": mfu(a["flops_per_image"], a["diffusers_images_per_s"], peak)})

    from benchmarks import latent_loader as ll

    demo_unet = unet_bench.CONFIGS["demo"]
    with tempfile.TemporaryDirectory() as tmp:
        size = dict(ll.DEMO)
        if quick:
            size.update(rows=1024, rows_per_shard=256)
        ll.build_random_store(f"{tmp}/store", size, "zarr")
        rates = ll.loader_rates(f"{tmp}/store", batch=size["batch"])
        consumption = ll.trainer_rate(demo_unet["unet"], tuple(size["latent"]), tuple(size["context"]),
                                      batch=size["batch"], steps=10 if quick else 40)
        rows.append({"row": "latent loader vs UNet step (demo, local zarr)", "ours": rates["cold_samples_per_s"],
                     "diffusers": consumption, "ratio": rates["cold_samples_per_s"] / consumption, "unit": "samples/s",
                     "note": "reference column: the trainer's consumption; ratio = loader (cold cache) ÷ consumption"})
        for e in ll.encode_runs(tmp, [100, 1000] if quick else [300, 3000], rows_per_shard=100):
            rows.append({"row": f"encode {e['rows']} images (tiny VAE + MiniLM)", "ours": e["images_per_second"],
                         "unit": "img/s", "note": f"peak RSS {e['peak_rss_mb']:.0f} MB"})
    result["seconds"] = time.time() - t0
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds and smaller sizes (a smoke run)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--json", default="benchmarks/results/suite.json")
    a = p.parse_args(argv)
    result = run(a.quick, a.precision)
    m = result["machine"]
    print(f"machine: {m['cpu']} | {m['threads']} threads | torch {m['torch']} | diffusers {m.get('diffusers')} | "
          f"device {m['device']} | {a.precision} matmul peak {result['matmul_peak_flops'] / 1e9:.0f} GFLOP/s")
    table = []
    for r in result["rows"]:
        table.append({
            "benchmark": r["row"], "ours": f"{r['ours']:.2f}",
            "diffusers / reference": f"{r['diffusers']:.2f}" if r.get("diffusers") is not None else "",
            "ratio": f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "", "unit": r["unit"],
            "GFLOP/item": f"{r['gflop_per_item']:.2f}" if r.get("gflop_per_item") else "",
            "MFU ours": f"{100 * r['mfu_ours']:.0f}%" if r.get("mfu_ours") is not None else "",
            "MFU diffusers": f"{100 * r['mfu_diffusers']:.0f}%" if r.get("mfu_diffusers") is not None else "",
            "note": r.get("note", ""),
        })
    print_table(table, ["benchmark", "ours", "diffusers / reference", "ratio", "unit", "GFLOP/item", "MFU ours",
                        "MFU diffusers", "note"])
    write_json(result, a.json)
    return result


if __name__ == "__main__":
    main()
