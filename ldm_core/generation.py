"""Text → image: the one function behind `ldm sample`, the registry's pyfunc model and the evaluation report.

generate(prompts, vae, denoiser, text_encoder, diffusion, …) encodes the prompts (and the empty prompt): tokens,
masks and pooled vectors, which every backbone takes (the MMDiT's modulation uses them, the UNet ignores them);
draws the initial noise per image from ``seed + i`` (so an image does not depend on what else is in the batch),
integrates the sampler with classifier-free guidance, and decodes the latents with the frozen autoencoder (which
undoes the latent scale in one place, ``decode_latents``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ldm_core.diffusion import Diffusion
from ldm_core.diffusion.guidance import cfg_model
from ldm_core.grids import to_uint8
from ldm_core.text_encoder import TextEncoder


@torch.inference_mode()
def generate(
    prompts: Sequence[str],
    vae: nn.Module,
    denoiser: nn.Module,
    text_encoder: TextEncoder,
    diffusion: Diffusion,
    latent_shape: tuple[int, int, int],
    *,
    steps: int | None = None,
    guidance: float = 4.0,
    seed: int = 0,
    sampler: str | None = None,
    eta: float | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    callback: Callable[[dict], None] | None = None,
) -> np.ndarray:
    """Images for ``prompts`` as uint8 (N, H, W, 3). ``latent_shape`` is (C, h, w) of one latent."""
    device = torch.device(device)
    vae = vae.to(device).eval()
    denoiser = denoiser.to(device).eval()
    empty = text_encoder.empty()
    u_ctx, u_mask, u_pooled = (
        empty.embeddings.to(device).float(),
        empty.mask.to(device),
        empty.pooled.to(device).float(),
    )
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else torch.autocast(device.type, enabled=False)
    )
    out: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        emb = text_encoder.encode(chunk)
        ctx, mask, pooled = emb.embeddings.to(device).float(), emb.mask.to(device), emb.pooled.to(device).float()
        # (b, C, h, w): image i's noise comes from seed + i alone
        noise = torch.stack(
            [
                torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed + start + i))
                for i in range(len(chunk))
            ]
        ).to(device)
        gen = torch.Generator(device=device).manual_seed(seed + start)
        model = cfg_model(denoiser, ctx, mask, u_ctx, u_mask, guidance, pooled=pooled, uncond_pooled=u_pooled)
        with amp:
            z = diffusion.sample(model, noise, steps=steps, sampler=sampler, eta=eta, generator=gen, callback=callback)
            images = vae.decode_latents(z.float())
        out.append(to_uint8(images))
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), np.uint8)
