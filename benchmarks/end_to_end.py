"""What caching buys: our `ldm_model` step on the latent store against the loop of diffusers' train_text_to_image.py.

    python -m benchmarks.end_to_end [--config demo|sd-like|all] [--json out.json]

Ours reads a batch of cached latents and text embeddings from a latent store on disk (what `ldm_model` trains on)
and takes the trainer's step. The reference does what train_text_to_image.py does every step: encode the pixels with
the VAE (a posterior sample × the latent scale) and the captions with the text encoder, then take the same step. The
models are identical in weights (our UNet and its diffusers conversion, our autoencoder and its diffusers conversion,
one MiniLM text encoder), the batch, the resolution, the objective and the optimizer (fused AdamW, EMA) are the same.
The reference's pixels are already decoded tensors and its captions already tokenized, which favours it.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable

import torch

from benchmarks.common import machine_info, print_table, time_alternating, write_json
from benchmarks.latent_loader import build_random_store
from ldm_core.data.latent_dataset import LatentDataset
from ldm_core.diffusion import DiffusionConfig, create_diffusion
from ldm_core.interop import to_diffusers
from ldm_core.models.autoencoder import AUTOENCODER_PRESETS, AutoencoderKL
from ldm_core.models.unet import UNET_PRESETS, UNet, UNetConfig
from ldm_core.text_encoder import TextEncoder, TextEncoderConfig
from ldm_core.trainers.step import EMA, make_adam

CONFIGS = {
    # the demo: tiny VAE at 32 px (8×8×4 latents), MiniLM tokens, the tiny UNet
    "demo": dict(vae="tiny", resolution=32, unet=UNET_PRESETS["tiny"], tokens=16, batch=32),
    # SD-like: the kl-f8 first stage at 256 px (32×32×4 latents), MiniLM tokens (the CLIP of SD is not available
    # offline), the mid-size UNet of benchmarks.unet at MiniLM's width
    "sd-like": dict(
        vae="kl-f8",
        resolution=256,
        tokens=77,
        batch=4,
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
}
CAPTION = "a small red circle in the top left"


def run(name: str, rounds: int = 4, device: str = "cpu") -> dict:
    spec = CONFIGS[name]
    dev = torch.device(device)
    torch.manual_seed(0)
    b, res = spec["batch"], spec["resolution"]
    vae = AutoencoderKL(AUTOENCODER_PRESETS[spec["vae"]].model_copy(update={"scaling_factor": 0.18215})).to(dev).eval()
    vae_theirs = to_diffusers(vae).to(dev).eval().requires_grad_(False)
    text = TextEncoder(TextEncoderConfig(max_length=spec["tokens"]), device=dev)
    unet = UNet(spec["unet"]).to(dev).train()
    unet_theirs = to_diffusers(unet).to(dev).train()
    diffusion = create_diffusion(DiffusionConfig(kind="ddpm", prediction="eps"))
    latent = vae.config.latent_shape(res)
    gen = torch.Generator(device=dev)

    def trainer_step(
        model: Callable,
        opt: torch.optim.Optimizer,
        ema: EMA,
        net: torch.nn.Module,
        x0: torch.Tensor,
        ctx: torch.Tensor,
        mask: torch.Tensor,
    ) -> None:
        sample = diffusion.training_sample(x0, gen)
        loss = diffusion.loss(model(sample.x_t, sample.t_model, ctx, mask).float(), sample)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(net)

    with tempfile.TemporaryDirectory() as tmp:
        store_url = f"{tmp}/store"
        rows = max(8 * b, 64)
        build_random_store(
            store_url,
            {"latent": latent, "context": (spec["tokens"], text.dim), "rows": rows, "rows_per_shard": rows, "batch": b},
            "zarr",
        )
        store = LatentDataset(store_url, split=None)
        order = iter(range(10**9))
        opt_ours = make_adam(list(unet.parameters()), dev, adamw=True, lr=1e-4)
        ema_ours = EMA(unet, 0.999)

        def ours() -> None:
            start = (next(order) * b) % (rows - b)
            batch = store.get_batch(list(range(start, start + b)))  # cached latents and text embeddings
            trainer_step(
                unet,
                opt_ours,
                ema_ours,
                unet,
                batch["latents"].to(dev),
                batch["context"].to(dev).float(),
                batch["context_mask"].to(dev),
            )

        pixels = torch.rand(b, 3, res, res, device=dev) * 2 - 1  # decoded and transformed by the DataLoader
        tokens = text.tokenizer(
            [CAPTION] * b, padding="max_length", truncation=True, max_length=spec["tokens"], return_tensors="pt"
        ).to(dev)
        opt_theirs = make_adam(list(unet_theirs.parameters()), dev, adamw=True, lr=1e-4)
        ema_theirs = EMA(unet_theirs, 0.999)

        def theirs_unet(x, t, ctx, mask):
            return unet_theirs(x, t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample

        def theirs() -> None:
            with torch.no_grad():  # train_text_to_image.py: both encoders frozen, run every step
                latents = vae_theirs.encode(pixels).latent_dist.sample(generator=gen) * vae.config.scaling_factor
                ctx = text.model(**tokens).last_hidden_state
            trainer_step(
                theirs_unet, opt_theirs, ema_theirs, unet_theirs, latents, ctx, tokens["attention_mask"].bool()
            )

        t = time_alternating({"ours": ours, "diffusers": theirs}, rounds=rounds, iters=1, warmup=1, device=dev)
        store.close()
    return {
        "benchmark": "end_to_end",
        "config": name,
        "resolution": res,
        "vae": spec["vae"],
        "batch": b,
        "unet": spec["unet"].to_dict(),
        "machine": machine_info(),
        "ours_images_per_s": b / t["ours"],
        "diffusers_images_per_s": b / t["diffusers"],
        "ratio": t["ratio"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    names = list(CONFIGS) if a.config == "all" else [a.config]
    results = [run(n, a.rounds, a.device) for n in names]
    print_table(
        [
            {
                "benchmark": f"ldm_model step on the latent store vs train_text_to_image loop ({r['config']}, "
                f"{r['vae']} at {r['resolution']} px, b{r['batch']})",
                "ours img/s": f"{r['ours_images_per_s']:.2f}",
                "diffusers img/s": f"{r['diffusers_images_per_s']:.2f}",
                "ratio": f"{r['ratio']:.2f}x",
            }
            for r in results
        ],
        ["benchmark", "ours img/s", "diffusers img/s", "ratio"],
    )
    write_json({"results": results}, a.json)
    return results


if __name__ == "__main__":
    main()
