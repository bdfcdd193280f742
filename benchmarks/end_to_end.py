"""What caching buys, encoding counted: `ldm_model`'s training loop on the latent store against the loop of
diffusers' train_text_to_image.py, which encodes every step.

    python -m benchmarks.end_to_end [--config demo|sd-like-mid|sd1|all] [--rounds N] [--threads N] [--json out.json]
    python -m benchmarks.end_to_end --render benchmarks/results/end_to_end.json   # the README's table

Three kinds of work, each round of each in a fresh spawned process (the SD-1 UNet's state, ~17 GB with AdamW and
the EMA, cannot share a process, or this 23 GB machine, with a second copy), in alternating order (each round
starts with the next kind):

- **ours**: `ldm_model`'s own loop and step (`prepare_ldm_training`, then `TrainingLoop.run` for one step per call):
  batches of cached latents and text embeddings read from a latent store on disk by the trainer's batch stream,
  caption dropout (0.1), the lr schedule, the DDPM ε loss, gradient clipping at 1.0, the fused AdamW step that skips
  a non-finite step on the device, the EMA (0.999) and the metric window, at the trainer's defaults.
- **reference**: what train_text_to_image.py does per step with its defaults: encode the pixels with the VAE
  (`latent_dist.sample() × scaling_factor`) and the token ids with the text encoder (ids only, no attention mask,
  as the script), `DDPMScheduler.add_noise`, the UNet with no `encoder_attention_mask` (as the script), fp32 MSE,
  backward, `clip_grad_norm_(1.0)`, AdamW with the script's settings (lr 1e-4, weight decay 1e-2) but the same
  fused kernel as ours (the script's `torch.optim.AdamW` runs its slower per-tensor loop on a CPU: the "as shipped"
  model rows measure that, this row measures caching), no EMA (`--use_ema` is off by default), the constant lr
  scheduler's step, `zero_grad`. Its pixels are already
  decoded tensors and its captions already tokenized (its DataLoader's work is not counted), which favours it.
- **encode**: the one-time cost of the cache: the same VAE's encoder (the posterior's moments, what
  `encode_dataset` stores) and the same text encoder, once per image, forward only. Image decoding and the store
  write are not counted (on either side).

The models are identical: our UNet and its diffusers conversion (same weights), our autoencoder and its diffusers
conversion, one text encoder. Per image: ``s_ours``, ``s_ref`` (seconds per trained image) and ``e`` (seconds to
encode one image). Over E epochs of N images the cache costs ``N·e + E·N·s_ours`` against ``E·N·s_ref``, so the
ratio after E epochs is ``E·s_ref / (e + E·s_ours)``; the steady state (E → ∞) is ``s_ref / s_ours`` (the median
of the rounds' ratios) and the cache breaks even after ``e / (s_ref − s_ours)`` epochs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import THREADS_HELP, in_fresh_process, machine_info, peak_rss_bytes, set_threads, write_json
from ldm_core.models.autoencoder import AUTOENCODER_PRESETS, AutoencoderKL
from ldm_core.models.unet import UNET_PRESETS, UNet, UNetConfig

MINILM = "all-MiniLM-L6-v2 (22.7M, real weights)"
CLIP_L = "CLIP ViT-L/14 text encoder (123M; SD-1's shape, random weights: the real ones are not available offline)"
CONFIGS: dict[str, dict[str, Any]] = {
    # the demo: tiny VAE at 32 px (8×8×4 latents), MiniLM tokens, the tiny UNet
    "demo": dict(
        vae="tiny",
        resolution=32,
        unet=UNET_PRESETS["tiny"],
        text="minilm",
        tokens=16,
        batch=32,
        rounds=3,
        warmup=10,
        iters=20,
    ),
    # the smaller SD-like pairing: SD-1's autoencoder at 256 px with a UNet of SD-1's layout at width 64 (not SD-1's
    # 320) and MiniLM: the encoding weighs far more against this UNet than against SD-1's
    "sd-like-mid": dict(
        vae="kl-f8",
        resolution=256,
        text="minilm",
        tokens=77,
        batch=4,
        rounds=3,
        warmup=2,
        iters=3,
        unet=UNetConfig(
            model_channels=64,
            channel_mult=[1, 2, 4, 4],
            num_res_blocks=2,
            attention_levels=[0, 1, 2],
            num_heads=8,
            context_dim=384,
            norm_groups=32,
        ),
    ),
    # true scale: SD-1's UNet, autoencoder and text encoder shape at 256 px
    "sd1": dict(
        vae="kl-f8",
        resolution=256,
        unet=UNET_PRESETS["sd1"],
        text="clip-l",
        tokens=77,
        batch=2,
        rounds=2,
        warmup=1,
        iters=2,
    ),
}
KINDS = ("ours", "reference", "encode")


# ---------------------------------------------------------------------------------------------------------------
# The three kinds of work, each built in its own process from the weights the parent wrote
# ---------------------------------------------------------------------------------------------------------------


def _text_model(spec: dict, dev: torch.device) -> tuple[torch.nn.Module, int]:
    """(the frozen text encoder, its token width): MiniLM's real weights, or a CLIP-L-shaped text model with seeded
    random weights (the same FLOPs as SD-1's)."""
    if spec["text"] == "minilm":
        from ldm_core.text_encoder import TextEncoder, TextEncoderConfig

        enc = TextEncoder(TextEncoderConfig(max_length=spec["tokens"]), device=dev)
        return enc.model.eval().requires_grad_(False), enc.dim
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
    return CLIPTextModel(cfg).to(dev).eval().requires_grad_(False), 768


def _token_ids(spec: dict, dev: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randint(1000, 20000, (spec["batch"], spec["tokens"]), generator=g).to(dev)


def _new_vae(spec: dict) -> AutoencoderKL:
    """The config's autoencoder preset at SD's latent scale (weights from the seeded init)."""
    return AutoencoderKL(AUTOENCODER_PRESETS[spec["vae"]].model_copy(update={"scaling_factor": 0.18215}))


def _save(module: torch.nn.Module, path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)


def _vae(spec: dict, weights: str, dev: torch.device) -> AutoencoderKL:
    from safetensors.torch import load_file

    vae = _new_vae(spec)
    vae.load_state_dict(load_file(weights))
    return vae.to(dev).eval().requires_grad_(False)


def _ours(spec: dict, work: str, dev: torch.device, lora_rank: int | None = None):
    """One call = one step of `ldm_model`'s loop (`TrainingLoop.run` with `_DenoiserStep`) on the latent store;
    ``lora_rank``: the run trains a LoRA adapter of that rank on the frozen UNet (`LDMTrainingConfig.lora`)."""
    from safetensors.torch import load_file

    from ldm_core.data.latent_dataset import LatentDataset
    from ldm_core.lora import LoraConfig
    from ldm_core.tracking import NullTracker
    from ldm_core.trainers.ldm import LDMTrainerConfig, LDMTrainingConfig, prepare_ldm_training
    from ldm_core.trainers.meters import ThroughputMeter

    store = LatentDataset(f"{work}/store", split=None)
    config = LDMTrainingConfig(
        denoiser=spec["unet"],
        lora=LoraConfig(rank=lora_rank) if lora_rank is not None else None,
        trainer=LDMTrainerConfig(batch_size=spec["batch"], steps=10**9, lr=1e-4, device=str(dev), precision="fp32"),
    )
    prep = prepare_ldm_training(
        config, store, uncond=store.uncond(), init_weights=load_file(f"{work}/unet.safetensors")
    )
    meter, tracker = ThroughputMeter(prep.run.device, "fp32"), NullTracker()

    def step() -> None:
        target = prep.loop.step + 1
        prep.loop.run(prep.step, tracker, meter, should_stop=lambda s: s >= target)

    step.prepared = prep  # type: ignore[attr-defined]  # for tests: the loop it drives
    step.trainable = sum(p.numel() for p in prep.parts.params)  # type: ignore[attr-defined]
    return step


def _reference(spec: dict, work: str, dev: torch.device, lora_rank: int | None = None):
    """One call = one step of train_text_to_image.py's loop at its defaults (see the module docstring); with
    ``lora_rank``, of train_text_to_image_lora.py's: the UNet frozen, ``unet.add_adapter`` of that rank on
    ``to_k``, ``to_q``, ``to_v``, ``to_out.0`` (gaussian init, alpha = rank), only the adapter optimized and clipped."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    from ldm_core.interop import to_diffusers
    from ldm_core.interop.unet import diffusers_kwargs
    from ldm_core.trainers.step import make_adam

    vae = to_diffusers(_vae(spec, f"{work}/vae.safetensors", dev)).to(dev).eval().requires_grad_(False)
    text, _ = _text_model(spec, dev)
    unet = UNet2DConditionModel(**diffusers_kwargs(spec["unet"]))
    unet.load_state_dict(load_file(f"{work}/unet-diffusers.safetensors"))
    unet = unet.to(dev).train()
    if lora_rank is not None:
        import peft

        unet.requires_grad_(False)
        unet.add_adapter(
            peft.LoraConfig(
                r=lora_rank,
                lora_alpha=lora_rank,
                init_lora_weights="gaussian",
                target_modules=["to_k", "to_q", "to_v", "to_out.0"],
            )
        )
    params = [p for p in unet.parameters() if p.requires_grad]
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    # the script's AdamW settings, with the same fused kernel as ours: torch.optim.AdamW's default on a CPU is its
    # per-tensor loop, and the "as shipped" model rows measure that difference, not this row
    opt = make_adam(params, dev, adamw=True, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # get_scheduler("constant")
    b, res = spec["batch"], spec["resolution"]
    pixels = torch.rand(b, 3, res, res, device=dev) * 2 - 1  # what its DataLoader yields after the transforms
    ids = _token_ids(spec, dev)

    def step() -> None:
        with torch.no_grad():  # both encoders frozen, run every step
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            ctx = text(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=dev).long()
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, ctx, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        opt.zero_grad()

    step.trainable = sum(p.numel() for p in params)  # type: ignore[attr-defined]
    return step


def _encode(spec: dict, work: str, dev: torch.device):
    """One call = encoding one batch for the store: the VAE's posterior moments and the text encoder's tokens."""
    vae = _vae(spec, f"{work}/vae.safetensors", dev)
    text, _ = _text_model(spec, dev)
    b, res = spec["batch"], spec["resolution"]
    pixels = torch.rand(b, 3, res, res, device=dev) * 2 - 1
    ids = _token_ids(spec, dev)
    mask = torch.ones_like(ids)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            post = vae.encode(pixels)
            moments = torch.cat([post.mean, post.logvar], dim=1)  # as the store keeps them
            tokens = text(ids, attention_mask=mask).last_hidden_state
        return moments, tokens

    return step


BUILDERS = {"ours": _ours, "reference": _reference, "encode": _encode}


def _round(name: str, kind: str, work: str, warmup: int, iters: int, device: str, threads: int | None, queue) -> None:
    """In a spawned process: build one kind of work, take ``warmup`` untimed calls (the first allocates AdamW's
    state), then time ``iters`` calls; puts the median seconds per call and the process's peak RSS."""
    set_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    fn = BUILDERS[kind](CONFIGS[name], work, dev)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    queue.put({"seconds": statistics.median(times), "times": times, "peak_rss_mb": peak_rss_bytes() / 2**20})


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def _write_inputs(name: str, work: str) -> dict[str, int]:
    """The identical starting weights (our UNet and its diffusers conversion, our autoencoder) and the latent store
    of cached latents and text embeddings; returns each model's parameter count."""
    from benchmarks.latent_loader import build_random_store
    from ldm_core.interop import to_diffusers

    spec = CONFIGS[name]
    torch.manual_seed(0)
    vae = _new_vae(spec)
    _save(vae, f"{work}/vae.safetensors")
    unet = UNet(spec["unet"])
    _save(unet, f"{work}/unet.safetensors")
    theirs = to_diffusers(unet)
    _save(theirs, f"{work}/unet-diffusers.safetensors")
    counts = {
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "unet_diffusers_parameters": sum(p.numel() for p in theirs.parameters()),
        "vae_parameters": sum(p.numel() for p in vae.parameters()),
        "vae_encoder_parameters": sum(
            p.numel() for n, p in vae.named_parameters() if n.startswith(("encoder.", "quant_conv."))
        ),
    }
    del unet, theirs, vae
    text, width = _text_model(spec, torch.device("cpu"))
    counts["text_encoder_parameters"] = sum(p.numel() for p in text.parameters())
    b, latent = spec["batch"], spec["vae"]
    shape = AUTOENCODER_PRESETS[latent].latent_shape(spec["resolution"])
    rows = max(8 * b, 64)
    build_random_store(
        f"{work}/store",
        {"latent": shape, "context": (spec["tokens"], width), "rows": rows, "rows_per_shard": rows, "batch": b},
        "zarr",
    )
    return counts


def derive(s_ours: float, s_ref: float, e: float, steady: float) -> dict[str, float | None]:
    """Per-image seconds (trained on the cache, trained by the reference, encoded once) and the steady-state ratio
    -> the ratio after 1 and 10 epochs and the break-even epoch count (None: the cache never pays)."""
    after = {E: E * s_ref / (e + E * s_ours) for E in (1, 10)}
    return {
        "steady_ratio": steady,
        "ratio_1_epoch": after[1],
        "ratio_10_epochs": after[10],
        "break_even_epochs": e / (s_ref - s_ours) if s_ref > s_ours else None,
        "encode_in_ours_steps": e / s_ours,
    }


def run(
    name: str, rounds: int | None = None, device: str = "cpu", threads: int | None = None, quick: bool = False
) -> dict:
    """``quick``: one untimed and one timed call per process (a smoke run; the figures mean nothing)."""
    spec = CONFIGS[name]
    warmup, iters = (1, 1) if quick else (spec["warmup"], spec["iters"])
    rounds = rounds or spec["rounds"]
    t0 = time.time()
    samples: dict[str, list[dict]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory() as work:
        counts = _write_inputs(name, work)
        for r in range(rounds):
            for kind in KINDS[r % 3 :] + KINDS[: r % 3]:  # each round starts with the next kind
                samples[kind].append(in_fresh_process(_round, name, kind, work, warmup, iters, device, threads))
    b = spec["batch"]
    sec = {k: statistics.median(s["seconds"] for s in v) for k, v in samples.items()}
    steady = statistics.median(r["seconds"] / o["seconds"] for o, r in zip(samples["ours"], samples["reference"]))
    per_image = {k: v / b for k, v in sec.items()}
    return {
        "benchmark": "end_to_end",
        "config": name,
        "resolution": spec["resolution"],
        "vae": spec["vae"],
        "text_encoder": MINILM if spec["text"] == "minilm" else CLIP_L,
        "tokens": spec["tokens"],
        "batch": b,
        "unet": spec["unet"].to_dict(),
        **counts,
        "rounds": rounds,
        "warmup": warmup,
        "iters": iters,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "machine": machine_info(),
        "rounds_raw": {k: v for k, v in samples.items()},
        "ours_images_per_s": 1 / per_image["ours"],
        "reference_images_per_s": 1 / per_image["reference"],
        "encode_images_per_s": 1 / per_image["encode"],
        "encode_s_per_image": per_image["encode"],
        **derive(per_image["ours"], per_image["reference"], per_image["encode"], steady),
        "seconds": time.time() - t0,
    }


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def label(r: dict) -> str:
    """What each side runs, with each model's size."""
    u = r["unet"]
    unet = f"UNet width {u['model_channels']}, {_m(r['unet_parameters'])}"
    if r["unet_diffusers_parameters"] != r["unet_parameters"]:
        unet += f" (diffusers' conversion {_m(r['unet_diffusers_parameters'])})"
    return (
        f"{r['config']}: {unet}; {r['vae']} autoencoder {_m(r['vae_parameters'])} (encoder "
        f"{_m(r['vae_encoder_parameters'])}) at {r['resolution']} px; {r['text_encoder']}, {r['tokens']} tokens; "
        f"batch {r['batch']}"
    )


def render(result: dict) -> str:
    """The README's end-to-end table from `python -m benchmarks.end_to_end --json`'s output."""
    rows = result["results"]
    m = rows[0]["machine"]
    counts = "; ".join(
        f"{r['config']}: {r['rounds']} rounds, {r['warmup']} untimed and {r['iters']} timed" for r in rows
    )
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {rows[0]['threads']} threads, device {m['device']}; torch "
        f"{m['torch']}, diffusers {m.get('diffusers')}. fp32. Each figure: the median of alternating "
        f"rounds (`{result.get('command', '')}`, started {result.get('started', 'unrecorded')}; a "
        f"fresh process per round and kind; in each, untimed steps first, then the median of "
        f"timed ones; {counts}); the run took {result.get('seconds', 0) / 60:.0f} min.",
        "",
        "| row (what each side runs) | ours img/s (cached) | reference img/s (encodes every step) | encode img/s "
        "(once) | encode cost, in our steps | steady state | 1 epoch | 10 epochs | break-even |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        be = r["break_even_epochs"]
        lines.append(
            f"| {label(r)} | {r['ours_images_per_s']:.3g} | {r['reference_images_per_s']:.3g} | "
            f"{r['encode_images_per_s']:.3g} | {r['encode_in_ours_steps']:.2f} | **{r['steady_ratio']:.2f}×** | "
            f"{r['ratio_1_epoch']:.2f}× | {r['ratio_10_epochs']:.2f}× | "
            + (f"{be:.2f} epochs |" if be is not None else "never |")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    p.add_argument("--rounds", type=int, default=None, help="rounds of each config (default: 3, 2 for sd1)")
    p.add_argument("--quick", action="store_true", help="one untimed and one timed call per round (a smoke run)")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="benchmarks/results/end_to_end.json")
    p.add_argument("--render", metavar="JSON", help="print the markdown table of a result file and exit")
    a = p.parse_args(argv)
    if a.render:
        result = json.loads(Path(a.render).read_text())
        print(render(result))
        return result
    set_threads(a.threads)
    t0 = time.time()
    names = list(CONFIGS) if a.config == "all" else [a.config]
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    result: dict = {
        "command": shlex.join(["python", "-m", "benchmarks.end_to_end", *(argv or sys.argv[1:])]),
        "started": started,
        "results": [],
    }
    for n in names:
        result["results"].append(run(n, a.rounds, a.device, a.threads, a.quick))
        result["seconds"] = time.time() - t0
        write_json(result, a.json)  # after every row: a stopped run keeps what it measured
    print(render(result))
    return result


if __name__ == "__main__":
    main()
