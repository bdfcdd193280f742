"""Best against best: each side's train step in its own fastest precision on this device.

    python -m benchmarks.best [--config unet-demo|unet-mid|mmdit-tiny|mmdit-mid|autoencoder-64px|all] [--rounds 5]
                              [--threads N] [--json out.json]

The like-for-like rows run both sides in one precision. Here each side gets the one it is fastest in: four steps are
timed in the same alternating rounds (ours fp32, ours bf16 autocast, diffusers fp32, diffusers bf16 autocast), each
on its own copy of the identical starting weights with its own optimizer (the same fused AdamW the model rows use; the
autoencoder's: the same fused Adam). Each side's best is its precision with the lower median step time; the ratio is
the median over rounds of diffusers' best time ÷ ours' best time in that round.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch

from benchmarks import autoencoder as ae_bench
from benchmarks import mmdit as mmdit_bench
from benchmarks import unet as unet_bench
from benchmarks.common import (
    THREADS_HELP,
    machine_info,
    print_table,
    round_ratio,
    set_threads,
    time_alternating,
    write_json,
)
from ldm_core.trainers.step import make_adam

PRECISIONS = ("fp32", "bf16")
SIDES = ("ours", "diffusers")
CONFIGS = {  # name: (the row's model, its config)
    "unet-demo": ("UNet", "demo"),
    "unet-mid": ("UNet", "mid"),
    "mmdit-tiny": ("MMDiT", "tiny"),
    "mmdit-mid": ("MMDiT", "mid"),
    "autoencoder-64px": ("AutoencoderKL", "64px"),
}
AE_BATCH = 4

StepMaker = Callable[[str, str], Callable[[], None]]  # (side, precision) -> a train step on a fresh copy


def _step_maker(name: str, dev: torch.device) -> tuple[StepMaker, int]:
    """(a function building one side's train step in one precision on its own copy of the weights, the batch)."""
    model, config = CONFIGS[name]
    if model == "AutoencoderKL":
        torch.manual_seed(0)
        ours = ae_bench.AutoencoderKL(ae_bench.BENCH_CONFIG).to(dev).train()
        nets = {"ours": ours, "diffusers": ae_bench.to_diffusers(ours).to(dev).train()}  # identical weights
        x = torch.randn(AE_BATCH, 3, 64, 64, device=dev)
        gen = torch.Generator(device=dev)

        def ae_step(side: str, precision: str) -> Callable[[], None]:
            net = copy.deepcopy(nets[side])
            return ae_bench.train_step(side, net, x, ae_bench.make_optimizer(net, dev), precision, gen)

        return ae_step, AE_BATCH
    bench = unet_bench if model == "UNet" else mmdit_bench
    su = bench.setup(config, dev)  # identical weights, one batch

    def step(side: str, precision: str) -> Callable[[], None]:
        net = copy.deepcopy(su.ours if side == "ours" else su.theirs)
        opt = make_adam(list(net.parameters()), dev, adamw=True, lr=1e-4)
        return unet_bench.train_step(su.forward(side, net), su.target, opt, unet_bench.autocast(dev, precision))

    return step, bench.CONFIGS[config]["batch"]


def run(name: str, rounds: int = 5, device: str = "cpu", threads: int | None = None) -> dict:
    """Both sides' four steps timed in one set of alternating rounds; each side's best precision and the ratio."""
    set_threads(threads)
    dev = torch.device(device)
    make, batch = _step_maker(name, dev)
    fns = {f"{side} {p}": make(side, p) for side in SIDES for p in PRECISIONS}
    t = time_alternating(fns, rounds=rounds, iters=1, warmup=1, device=dev)
    best = {side: min(PRECISIONS, key=lambda p, s=side: t[f"{s} {p}"]) for side in SIDES}
    model, config = CONFIGS[name]
    return {
        "benchmark": "best",
        "config": name,
        "label": f"best vs best: {model} train step ({config}) — ours {best['ours']}, diffusers {best['diffusers']}",
        "batch": batch,
        "rounds": rounds,
        "machine": machine_info(),
        "precision_ours": best["ours"],
        "precision_diffusers": best["diffusers"],
        "seconds": {k: t[k] for k in fns},  # median s/step of each side in each precision
        "ours_images_per_s": batch / t[f"ours {best['ours']}"],
        "diffusers_images_per_s": batch / t[f"diffusers {best['diffusers']}"],
        "ratio": round_ratio(t["samples"], f"diffusers {best['diffusers']}", f"ours {best['ours']}"),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    a = p.parse_args(argv)
    names = list(CONFIGS) if a.config == "all" else [a.config]
    results = [run(n, a.rounds, a.device, a.threads) for n in names]
    print_table(
        [
            {
                "benchmark": r["label"],
                "ours img/s": f"{r['ours_images_per_s']:.2f}",
                "diffusers img/s": f"{r['diffusers_images_per_s']:.2f}",
                "ratio": f"{r['ratio']:.2f}x",
                **{f"{k} s": f"{v:.3f}" for k, v in r["seconds"].items()},
            }
            for r in results
        ],
        ["benchmark", "ours img/s", "diffusers img/s", "ratio", *(f"{s} {p} s" for s in SIDES for p in PRECISIONS)],
    )
    write_json({"results": results}, a.json)
    return results


if __name__ == "__main__":
    main()
