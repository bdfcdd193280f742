"""LoRA fine-tuning: our step on cached latents against the loop of diffusers' train_text_to_image_lora.py, and our
full fine-tuning against our LoRA.

    python -m benchmarks.lora [--config demo|sd-like|all] [--rank 4] [--rounds 4] [--threads N] [--json PATH]
    python -m benchmarks.lora --quick   # smoke: demo only, 2 rounds; writes benchmarks/results/lora-quick.json
    python -m benchmarks.lora --render benchmarks/results/lora.json   # the README's markdown, from the JSON

The JSON (default benchmarks/results/lora.json, the README's "lora" block: `python -m benchmarks.readme`) records the
command, the machine, when the run started and how long it took, and the parameter counts of every model each side
runs per step (our UNet, diffusers' conversion of it, the VAE and the text encoder the reference runs every step).

Three steps, each on the same base weights (our UNet and its diffusers conversion, `ldm_core.interop.to_diffusers`),
batch, resolution, objective (DDPM ε) and optimizer (fused AdamW, lr 1e-4, gradients clipped at 1.0; no EMA, as the
LoRA script keeps none):
- ours, LoRA: a batch of cached latents and text embeddings from a latent store on disk (what `ldm_model` trains
  on), the UNet frozen with a rank-r adapter (`ldm_core.lora.add_lora`, its default targets: the fused ``qkv`` of
  each self-attention, ``to_q`` and the fused ``to_kv`` of each cross-attention, every ``to_out``);
- diffusers, LoRA: what the script does every step: encode the pixels with the VAE (a posterior sample × the
  latent scale) and the captions with the text encoder, then step a UNet2DConditionModel frozen with
  ``unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian", target_modules=["to_k", "to_q",
  "to_v", "to_out.0"]))``. The same attention weights are adapted on both sides, but a fused projection carries one
  rank-r adapter where diffusers has one per projection (q, k, v: 3; k, v: 2), so our adapter is smaller: both
  sides' trainable parameter counts are reported;
- ours, full: the step of ours, LoRA, with every UNet weight trained.
The reference's pixels are already decoded tensors and its captions already tokenized, which favours it; it passes
no text mask to its UNet, as the script does (ours masks padded tokens). Speed is
timed in alternating rounds of the three in this process (ratios: of the median step times); memory in a fresh process
per side, as in benchmarks.memory: "step MB" is the peak during a step above what the process held before it
(activations, gradients), "peak MB" the peak itself (with the weights and the optimizer state, where LoRA saves).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import peft
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
from benchmarks.latent_loader import build_random_store
from benchmarks.memory import step_memory
from ldm_core.data.latent_dataset import LatentDataset
from ldm_core.diffusion import DiffusionConfig, create_diffusion
from ldm_core.interop import to_diffusers
from ldm_core.lora import LoraConfig, add_lora
from ldm_core.models.autoencoder import AUTOENCODER_PRESETS, AutoencoderKL
from ldm_core.models.unet import UNet
from ldm_core.text_encoder import TextEncoder, TextEncoderConfig
from ldm_core.trainers.step import make_adam

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
CONFIGS = {"demo": e2e.CONFIGS["demo"], "sd-like": e2e.CONFIGS["sd-like-mid"]}
CAPTION = "a small red circle in the top left"


def _base_unet(spec: dict, dev: torch.device) -> UNet:
    torch.manual_seed(0)  # identical base weights on every side, in every process
    return UNet(spec["unet"]).to(dev)


def _train_step(gen: torch.Generator, params: list[torch.Tensor], opt: torch.optim.Optimizer) -> Callable[..., None]:
    """The step both sides take once they hold latents and text embeddings."""
    diffusion = create_diffusion(DiffusionConfig(kind="ddpm", prediction="eps"))

    def step(model: Callable, x0: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> None:
        sample = diffusion.training_sample(x0, gen)
        diffusion.loss(model(sample.x_t, sample.t_model, ctx, mask).float(), sample).backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _diffusers_lora(spec: dict, rank: int, dev: torch.device) -> tuple[Callable[[], None], int]:
    """train_text_to_image_lora.py's step: encode pixels and captions, then step the adapted UNet."""
    b, res = spec["batch"], spec["resolution"]
    unet = to_diffusers(_base_unet(spec, dev)).to(dev).requires_grad_(False)
    unet.add_adapter(
        peft.LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=DIFFUSERS_TARGETS)
    )
    unet.train()
    vae_config = AUTOENCODER_PRESETS[spec["vae"]].model_copy(update={"scaling_factor": 0.18215})
    vae = to_diffusers(AutoencoderKL(vae_config)).to(dev).eval().requires_grad_(False)
    text = TextEncoder(TextEncoderConfig(max_length=spec["tokens"]), device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    params = [p for p in unet.parameters() if p.requires_grad]
    step = _train_step(gen, params, make_adam(params, dev, adamw=True, lr=LR))
    pixels = torch.rand(b, 3, res, res, device=dev) * 2 - 1  # decoded and transformed by the DataLoader
    tokens = text.tokenizer(
        [CAPTION] * b, padding="max_length", truncation=True, max_length=spec["tokens"], return_tensors="pt"
    ).to(dev)

    def model(x, t, ctx, mask):
        # the script passes no text mask (diffusers' masked attention path would cost it time it does not spend)
        return unet(x, t, encoder_hidden_states=ctx).sample

    def diffusers_step() -> None:
        with torch.no_grad():  # both encoders frozen, run every step
            latents = vae.encode(pixels).latent_dist.sample(generator=gen) * vae_config.scaling_factor
            ctx = text.model(**tokens).last_hidden_state
        step(model, latents, ctx, tokens["attention_mask"].bool())

    return diffusers_step, sum(p.numel() for p in params)


def _ours(spec: dict, lora_rank: int | None, dev: torch.device, stack: ExitStack) -> tuple[Callable[[], None], int]:
    """Our ldm_model step on a latent store: with a LoRA of ``lora_rank``, or full fine-tuning (None)."""
    b, res = spec["batch"], spec["resolution"]
    unet = _base_unet(spec, dev)
    if lora_rank is not None:
        unet = add_lora(unet, LoraConfig(rank=lora_rank))
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    step = _train_step(torch.Generator(device=dev).manual_seed(0), params, make_adam(params, dev, adamw=True, lr=LR))
    tmp = stack.enter_context(tempfile.TemporaryDirectory())
    rows = max(8 * b, 64)
    latent = AUTOENCODER_PRESETS[spec["vae"]].latent_shape(res)
    build_random_store(
        f"{tmp}/store",
        {
            "latent": latent,
            "context": (spec["tokens"], spec["unet"].context_dim),
            "rows": rows,
            "rows_per_shard": rows,
            "batch": b,
        },
        "zarr",
    )
    store = LatentDataset(f"{tmp}/store", split=None)
    stack.callback(store.close)
    order = iter(range(10**9))

    def ours_step() -> None:
        start = (next(order) * b) % (rows - b)
        batch = store.get_batch(list(range(start, start + b)))  # cached latents and text embeddings
        step(unet, batch["latents"].to(dev), batch["context"].to(dev).float(), batch["context_mask"].to(dev))

    return ours_step, sum(p.numel() for p in params)


def build_step(name: str, side: str, rank: int, dev: torch.device, stack: ExitStack) -> tuple[Callable[[], None], int]:
    """(one training step of ``side``, its trainable parameter count); ``stack`` holds our latent store open."""
    spec = CONFIGS[name]
    if side == "diffusers_lora":
        return _diffusers_lora(spec, rank, dev)
    return _ours(spec, rank if side == "ours_lora" else None, dev, stack)


def _memory(name: str, side: str, rank: int, device: str, threads: int | None, queue) -> None:
    set_threads(threads)
    dev = torch.device(device)
    with ExitStack() as stack:
        step, _ = build_step(name, side, rank, dev, stack)
        step()  # the first step allocates the optimizer state, held from then on
        added, peak = step_memory(step, dev)
        # the thread count this process measured with: --threads reaches the spawned process too
        queue.put({"step_mb": added / 2**20, "peak_mb": peak / 2**20, "threads": torch.get_num_threads()})


def measure_memory(name: str, side: str, rank: int, device: str, threads: int | None) -> dict:
    return in_fresh_process(_memory, name, side, rank, device, threads)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_sizes(name: str) -> dict[str, int]:
    """Parameter counts of the models each side runs per step of config ``name``: our UNet, diffusers' conversion of
    it (the reference's UNet), and the VAE and the text encoder the reference runs every step (ours read their
    outputs from the latent store)."""
    spec = CONFIGS[name]
    unet = _base_unet(spec, torch.device("cpu"))
    vae = AutoencoderKL(AUTOENCODER_PRESETS[spec["vae"]].model_copy(update={"scaling_factor": 0.18215}))
    text = TextEncoder(TextEncoderConfig(max_length=spec["tokens"]), device=torch.device("cpu"))
    return {
        "unet_ours": _count(unet),
        "unet_diffusers": _count(to_diffusers(unet)),
        "vae": _count(to_diffusers(vae)),
        "text_encoder": _count(text.model),
    }


def run(name: str, rank: int = 4, rounds: int = 4, device: str = "cpu", threads: int | None = None) -> dict:
    set_threads(threads)
    dev = torch.device(device)
    b = CONFIGS[name]["batch"]
    with ExitStack() as stack:
        steps, trainable = {}, {}
        for side in SIDES:
            steps[side], trainable[side] = build_step(name, side, rank, dev, stack)
        # each round starts with the next side (time_alternating), so no side always runs first
        seconds = time_alternating(steps, rounds=rounds, iters=1, warmup=1, device=dev)  # median s/step of each
    memory = {side: measure_memory(name, side, rank, device, threads) for side in SIDES}  # same --threads
    return {
        "benchmark": "lora",
        "config": name,
        "rank": rank,
        "rounds": rounds,
        "batch": b,
        "resolution": CONFIGS[name]["resolution"],
        "vae": CONFIGS[name]["vae"],
        "unet": CONFIGS[name]["unet"].to_dict(),
        "models": model_sizes(name),
        "machine": machine_info(),
        "sides": {
            side: {"images_per_s": b / seconds[side], "trainable_parameters": trainable[side], **memory[side]}
            for side in SIDES
        },
        "ratio_vs_diffusers": seconds["diffusers_lora"] / seconds["ours_lora"],
        "lora_vs_full": seconds["ours_full"] / seconds["ours_lora"],
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
        "Ours LoRA ÷ the script's loop (ratio of the median step times): "
        + ", ".join(f"**{r['ratio_vs_diffusers']:.2f}×** ({r['config']})" for r in doc["results"])
        + "; LoRA ÷ our full fine-tuning: "
        + ", ".join(f"{r['lora_vs_full']:.2f}× ({r['config']})" for r in doc["results"])
        + "."
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
