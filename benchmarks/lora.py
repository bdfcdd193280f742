"""LoRA fine-tuning: our step on cached latents against the loop of diffusers' train_text_to_image_lora.py, and our
full fine-tuning against our LoRA.

    python -m benchmarks.lora [--config demo|sd-like|all] [--rank 4] [--rounds 4] [--threads N] [--json PATH]
    python -m benchmarks.lora --quick   # smoke: demo only, 2 rounds; writes benchmarks/results/lora-quick.json
    python -m benchmarks.lora --render benchmarks/results/lora.json   # the README's markdown, from the JSON

The JSON (default benchmarks/results/lora.json, the README's "lora" block: `python -m benchmarks.readme`) records the
command, the machine, when the run started and how long it took, and the parameter counts of every model each side
runs per step (our UNet, diffusers' conversion of it, the VAE and the text encoder the reference runs every step).

Three kinds of training step and the one-time encoding, on the same base weights (our UNet and its diffusers
conversion, `ldm_core.interop.to_diffusers`), batch and resolution, built by `benchmarks.end_to_end`'s builders:
- ours, LoRA: `ldm_model`'s own loop and step (`prepare_ldm_training` with ``lora: {rank: r}``, `TrainingLoop.run`
  one step per call) on cached latents and text embeddings from a latent store on disk: the UNet frozen with a
  rank-r adapter (`ldm_core.lora.add_lora`, its default targets: the fused ``qkv`` of each self-attention, ``to_q``
  and the fused ``to_kv`` of each cross-attention, every ``to_out``), at the trainer's defaults (caption dropout,
  clipping at 1.0, the adapter's EMA, the fused AdamW);
- diffusers, LoRA: what train_text_to_image_lora.py does every step at its defaults: encode the pixels with the VAE
  and the token ids with the text encoder, `DDPMScheduler.add_noise`, a UNet2DConditionModel frozen with
  ``unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian", target_modules=["to_k", "to_q",
  "to_v", "to_out.0"]))`` and no text mask, fp32 MSE, ``clip_grad_norm_(1.0)`` of the adapter, AdamW (lr 1e-4,
  weight decay 1e-2) on the same fused kernel as ours, no EMA. The same attention weights are adapted on both sides,
  but a fused projection carries one rank-r adapter where diffusers has one per projection (q, k, v: 3; k, v: 2),
  so our adapter is smaller: both sides' trainable parameter counts are reported;
- ours, full: `ldm_model`'s loop with every UNet weight trained (and the whole UNet's EMA);
- encode: the one-time cost of the cache (the VAE's encoder and the text encoder once per image), from which the
  ratio after 1 and 10 epochs and the break-even epoch count follow as in `benchmarks.end_to_end`.
The reference's pixels are already decoded tensors and its captions already tokenized, which favours it. Speed is
timed in alternating rounds of the four in this process (ratios: the median of the rounds' ratios); memory in a fresh
process per side, as in benchmarks.memory: "step MB" is the peak during a step above what the process held before it
(activations, gradients), "peak MB" the peak itself (with the weights and the optimizer state, where LoRA saves).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks import end_to_end as e2e
from benchmarks.common import (
    THREADS_HELP,
    in_fresh_process,
    machine_info,
    print_table,
    set_threads,
    time_alternating,
    write_json,
)
from benchmarks.memory import step_memory

SIDES = ("ours_lora", "diffusers_lora", "ours_full")
LABELS = {
    "ours_lora": "ours, LoRA (cached latents)",
    "diffusers_lora": "diffusers LoRA script loop (VAE + text encoder every step)",
    "ours_full": "ours, full fine-tuning (cached latents)",
}
DEFAULT_JSON, QUICK_JSON = "benchmarks/results/lora.json", "benchmarks/results/lora-quick.json"
SD1_UNET_PARAMETERS = 859_520_964  # SD-1.x's UNet2DConditionModel, for scale: the SD-like row's UNet is far smaller
DIFFUSERS_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # train_text_to_image_lora.py's
LR, MAX_GRAD_NORM = 1e-4, 1.0  # the script's defaults

# the end-to-end benchmark's demo and smaller SD-like pairing (the mid UNet, not SD-1's): the same VAE, text encoder,
# resolution and batch, so its encode rate is this row's one-time cost too
E2E_NAMES = {"demo": "demo", "sd-like": "sd-like-mid"}
CONFIGS = {name: e2e.CONFIGS[e2e_name] for name, e2e_name in E2E_NAMES.items()}
CAPTION = "a small red circle in the top left"


def build_step(name: str, side: str, rank: int, work: str, dev: torch.device) -> Callable[[], None]:
    """One training step of ``side`` (its ``trainable`` attribute: the parameter count it optimizes), built from the
    weights and the latent store `benchmarks.end_to_end._write_inputs` wrote to ``work``; "encode" is the one-time
    encoding of a batch for the store."""
    spec = CONFIGS[name]
    if side == "diffusers_lora":
        return e2e._reference(spec, work, dev, lora_rank=rank)
    if side == "encode":
        return e2e._encode(spec, work, dev)
    return e2e._ours(spec, work, dev, lora_rank=rank if side == "ours_lora" else None)


def _memory(name: str, side: str, rank: int, work: str, device: str, threads: int | None, queue) -> None:
    set_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    step = build_step(name, side, rank, work, dev)
    step()  # the first step allocates the optimizer state, held from then on
    added, peak = step_memory(step, dev)
    # the thread count this process measured with: --threads reaches the spawned process too
    queue.put({"step_mb": added / 2**20, "peak_mb": peak / 2**20, "threads": torch.get_num_threads()})


def measure_memory(name: str, side: str, rank: int, work: str, device: str, threads: int | None) -> dict:
    return in_fresh_process(_memory, name, side, rank, work, device, threads)


def run(name: str, rank: int = 4, rounds: int = 4, device: str = "cpu", threads: int | None = None) -> dict:
    set_threads(threads)
    dev = torch.device(device)
    spec = CONFIGS[name]
    b = spec["batch"]
    with tempfile.TemporaryDirectory() as work:
        counts = e2e._write_inputs(E2E_NAMES[name], work)
        torch.manual_seed(0)
        steps = {side: build_step(name, side, rank, work, dev) for side in (*SIDES, "encode")}
        # each round starts with the next side (time_alternating), so no side always runs first
        t = time_alternating(steps, rounds=rounds, iters=spec["iters"], warmup=spec["warmup"], device=dev)
        memory = {side: measure_memory(name, side, rank, work, device, threads) for side in SIDES}  # same --threads
    per_round = t["samples"]
    ratio = statistics.median(d / o for o, d in zip(per_round["ours_lora"], per_round["diffusers_lora"]))
    per_image = {k: t[k] / b for k in (*SIDES, "encode")}
    epochs = e2e.derive(per_image["ours_lora"], per_image["diffusers_lora"], per_image["encode"], ratio)
    del epochs["steady_ratio"]  # = ratio_vs_diffusers
    return {
        "benchmark": "lora",
        "config": name,
        "rank": rank,
        "rounds": rounds,
        "warmup": spec["warmup"],
        "iters": spec["iters"],
        "batch": b,
        "resolution": spec["resolution"],
        "vae": spec["vae"],
        "unet": spec["unet"].to_dict(),
        "models": {
            "unet_ours": counts["unet_parameters"],
            "unet_diffusers": counts["unet_diffusers_parameters"],
            "vae": counts["vae_parameters"],
            "text_encoder": counts["text_encoder_parameters"],
        },
        "machine": machine_info(),
        "sides": {
            side: {"images_per_s": 1 / per_image[side], "trainable_parameters": steps[side].trainable, **memory[side]}
            for side in SIDES
        },
        "encode_images_per_s": 1 / per_image["encode"],
        "ratio_vs_diffusers": ratio,
        "lora_vs_full": statistics.median(f / o for o, f in zip(per_round["ours_lora"], per_round["ours_full"])),
        **{
            k: v
            for k, v in e2e.derive(
                per_image["ours_lora"], per_image["diffusers_lora"], per_image["encode"], ratio
            ).items()
            if k != "steady_ratio"
        },
    }


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _config_label(r: dict) -> str:
    """What both sides run at this config, with every model's size (both UNets' where they differ)."""
    m, u = r["models"], r["unet"]
    unets = (
        f"UNet {_m(m['unet_ours'])} both sides"
        if m["unet_ours"] == m["unet_diffusers"]
        else f"UNet ours {_m(m['unet_ours'])}, diffusers' conversion {_m(m['unet_diffusers'])}"
    )
    width = f"UNet width {u['model_channels']}, channel_mult {'/'.join(map(str, u['channel_mult']))}"
    if r["config"] == "sd-like":
        width += f": the mid UNet, not SD-1's ({_m(SD1_UNET_PARAMETERS)})"
    return (
        f"{r['config']} ({r['vae']} VAE at {r['resolution']} px, {width}; batch {r['batch']}, rank {r['rank']}; "
        f"{unets}; the reference also runs the VAE {_m(m['vae'])} and the text encoder {_m(m['text_encoder'])} "
        "every step)"
    )


def _run_line(doc: dict) -> str:
    m = doc["results"][0]["machine"]
    when = (
        f"started {doc['started']}, took {doc['seconds'] / 60:.1f} min"
        if "started" in doc and "seconds" in doc
        else "start time and duration not recorded"
    )
    rounds = sorted({r.get("rounds") for r in doc["results"]} - {None})
    return (
        f"`{doc.get('command', 'command not recorded')}`: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, "
        f"device {m['device']}; torch {m['torch']}, diffusers {m.get('diffusers')}, Python {m['python']}; fp32; "
        f"{when}; speed in {'/'.join(map(str, rounds)) or 'unrecorded'} alternating rounds (each started by the next "
        "side), memory in a fresh process per side."
        + (" (--quick)" if doc.get("quick") else "")
        + (f" Backfilled {doc['backfilled']}." if doc.get("backfilled") else "")
    )


def render(doc: dict) -> str:
    """The README's LoRA table, from what `main` wrote (``{"results": [...], "command": ..., ...}``)."""
    lines = [
        _run_line(doc),
        "",
        "| config | step | img/s | step MB | peak MB | trainable parameters |",
        "|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        for i, (side, s) in enumerate(r["sides"].items()):
            lines.append(
                f"| {_config_label(r) if i == 0 else ''} | {LABELS[side]} | {s['images_per_s']:.3g} | "
                f"{s['step_mb']:.0f} | {s['peak_mb']:.0f} | {s['trainable_parameters']:,} |"
            )
    lines.append("")
    lines.append(
        "Ours LoRA ÷ the script's loop per step (the median of the rounds' ratios; the many-epoch limit): "
        + ", ".join(f"**{r['ratio_vs_diffusers']:.2f}×** ({r['config']})" for r in doc["results"])
        + "; LoRA ÷ our full fine-tuning: "
        + ", ".join(f"{r['lora_vs_full']:.2f}× ({r['config']})" for r in doc["results"])
        + "."
    )
    for r in doc["results"]:
        if "encode_images_per_s" not in r:
            continue
        be = r["break_even_epochs"]
        lines.append(
            f"{r['config']}: the one-time encoding runs at {r['encode_images_per_s']:.3g} img/s (an image's encoding "
            f"costs {r['encode_in_ours_steps']:.2f} of our LoRA steps' per-image time); counted once, ours LoRA ÷ the "
            f"script's loop is {r['ratio_1_epoch']:.2f}× after 1 epoch and {r['ratio_10_epochs']:.2f}× after 10; "
            + (f"the cache breaks even after {be:.2f} epochs." if be is not None else "the cache never breaks even.")
        )
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a smoke run: demo only, 2 rounds, to " + QUICK_JSON)
    p.add_argument("--json", default=None, help=f"default {DEFAULT_JSON} ({QUICK_JSON} with --quick)")
    p.add_argument("--render", metavar="JSON", help="print the markdown of an earlier run's JSON; measure nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = _parse(argv)
    if a.render:
        doc = json.loads(Path(a.render).read_text())
        print(render(doc))
        return doc
    names = ["demo"] if a.quick else list(CONFIGS) if a.config == "all" else [a.config]
    rounds = 2 if a.quick else a.rounds
    started, t0 = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), time.perf_counter()
    results = [run(n, a.rank, rounds, a.device, a.threads) for n in names]
    doc = {
        "command": "python -m benchmarks.lora " + shlex.join(sys.argv[1:] if argv is None else argv),
        "started": started,
        "seconds": time.perf_counter() - t0,
        "quick": a.quick,
        "results": results,
    }
    print_table(
        [
            {
                "config": f"{r['config']} ({r['vae']} at {r['resolution']} px, b{r['batch']}, rank {r['rank']})",
                "step": LABELS[side],
                "img/s": f"{s['images_per_s']:.2f}",
                "step MB": f"{s['step_mb']:.0f}",
                "peak MB": f"{s['peak_mb']:.0f}",
                "trainable": f"{s['trainable_parameters']:,}",
            }
            for r in results
            for side, s in r["sides"].items()
        ],
        ["config", "step", "img/s", "step MB", "peak MB", "trainable"],
    )
    print()
    print(render(doc))
    write_json(doc, a.json or (QUICK_JSON if a.quick else DEFAULT_JSON))
    return doc


if __name__ == "__main__":
    main()
