"""LoRA fine-tuning: our step on cached latents against the loop of diffusers' train_text_to_image_lora.py, and our
full fine-tuning against our LoRA.

    python -m benchmarks.lora [--config demo|sd-like|all] [--rank 4] [--rounds 4] [--threads N] [--json out.json]

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
import tempfile
from collections.abc import Callable
from contextlib import ExitStack

import peft
import torch

from benchmarks.common import (
    in_fresh_process,
    machine_info,
    print_table,
    set_threads,
    time_alternating,
    write_json,
)
from benchmarks.end_to_end import CAPTION, CONFIGS
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
DIFFUSERS_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # train_text_to_image_lora.py's
LR, MAX_GRAD_NORM = 1e-4, 1.0  # the script's defaults


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
        queue.put({"step_mb": added / 2**20, "peak_mb": peak / 2**20})


def measure_memory(name: str, side: str, rank: int, device: str, threads: int | None) -> dict:
    return in_fresh_process(_memory, name, side, rank, device, threads)


def run(name: str, rank: int = 4, rounds: int = 4, device: str = "cpu", threads: int | None = None) -> dict:
    set_threads(threads)
    dev = torch.device(device)
    b = CONFIGS[name]["batch"]
    with ExitStack() as stack:
        steps, trainable = {}, {}
        for side in SIDES:
            steps[side], trainable[side] = build_step(name, side, rank, dev, stack)
        seconds = time_alternating(steps, rounds=rounds, iters=1, warmup=1, device=dev)  # median s/step of each
    memory = {side: measure_memory(name, side, rank, device, threads) for side in SIDES}
    return {
        "benchmark": "lora",
        "config": name,
        "rank": rank,
        "batch": b,
        "resolution": CONFIGS[name]["resolution"],
        "vae": CONFIGS[name]["vae"],
        "unet": CONFIGS[name]["unet"].to_dict(),
        "machine": machine_info(),
        "sides": {
            side: {"images_per_s": b / seconds[side], "trainable_parameters": trainable[side], **memory[side]}
            for side in SIDES
        },
        "ratio_vs_diffusers": seconds["diffusers_lora"] / seconds["ours_lora"],
        "lora_vs_full": seconds["ours_full"] / seconds["ours_lora"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    names = list(CONFIGS) if a.config == "all" else [a.config]
    results = [run(n, a.rank, a.rounds, a.device, a.threads) for n in names]
    labels = {
        "ours_lora": "ours, LoRA (cached latents)",
        "diffusers_lora": "diffusers LoRA script loop",
        "ours_full": "ours, full fine-tuning (cached latents)",
    }
    print_table(
        [
            {
                "config": f"{r['config']} ({r['vae']} at {r['resolution']} px, b{r['batch']}, rank {r['rank']})",
                "step": labels[side],
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
    for r in results:
        print(
            f"{r['config']}: ours LoRA {r['ratio_vs_diffusers']:.2f}x diffusers' LoRA loop; "
            f"LoRA {r['lora_vs_full']:.2f}x our full fine-tuning (ratios of the median step times)"
        )
    write_json({"results": results}, a.json)
    return results


if __name__ == "__main__":
    main()
