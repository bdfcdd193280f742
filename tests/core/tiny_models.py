"""Tiny real models for tests, built offline: a CLIP text model with the MiniLM tokenizer, a diffusers UNet, and a
text-to-image bundle of random (not zero-initialised) weights around any text encoder."""

from pathlib import Path

import diffusers
import torch
from transformers import BertTokenizerFast, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm_core.bundle import save_text_to_image
from ldm_core.diffusion import DiffusionConfig
from ldm_core.models.autoencoder import AutoencoderConfig, build_autoencoder
from ldm_core.models.denoiser import build_denoiser, parse_denoiser_config
from ldm_core.text_encoder import TextEncoder, resolve_model_path


def tiny_diffusers_unet(cross_attention_dim: int = 384) -> diffusers.UNet2DConditionModel:
    """A two-level UNet2DConditionModel for 4-channel latents (the tiny autoencoder's) and tokens of the given width
    (384: MiniLM's, the tiny pipeline's text encoder)."""
    return diffusers.UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )


def tiny_clip(folder: Path, with_projection: bool, seed: int = 0) -> torch.nn.Module:
    """A random CLIP text model with the MiniLM tokenizer; its EOS is BERT's [SEP] (id 102), so the pooled token is
    the caption's last real one, as with CLIP's own tokenizer."""
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=30522,
        max_position_embeddings=16,
        projection_dim=24,
        eos_token_id=102,
        bos_token_id=101,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()
    model.save_pretrained(folder)
    BertTokenizerFast.from_pretrained(resolve_model_path("all-MiniLM-L6-v2")).save_pretrained(folder)
    return model


def jitter(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Random offsets on every weight: zero-initialised output layers would make any two models agree trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_bundle(
    url: str,
    text_encoder: TextEncoder,
    diffusion: DiffusionConfig,
    denoiser: dict | None = None,
    guidance: float = 3.0,
    vae: dict | None = None,
) -> str:
    """A bundle of a tiny VAE (32 px, 8x8x4 latents) and a tiny denoiser (UNet unless ``denoiser`` says otherwise)
    whose context width is the text encoder's."""
    vae_model = jitter(build_autoencoder(AutoencoderConfig.model_validate({"preset": "tiny", **(vae or {})})), 1)
    spec = {"kind": "unet", "preset": "tiny", **(denoiser or {}), "context_dim": text_encoder.dim}
    if spec["kind"] == "mmdit":
        spec["pooled_projection_dim"] = text_encoder.pooled_dim
    den = jitter(build_denoiser(parse_denoiser_config(spec)), 2)
    z = vae_model.config.z_channels
    return save_text_to_image(
        url,
        denoiser=den.eval(),
        vae=vae_model.eval(),
        diffusion_config=diffusion,
        text_encoder_config=text_encoder.config,
        text_encoder=text_encoder,
        latent_shape=(z, 8, 8),
        guidance=guidance,
    )
