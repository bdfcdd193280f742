"""Tiny diffusers AutoencoderKLs saved as the Hub ships them (``save_pretrained``), standing in for SD's kl-f8 and
16-channel SD3/FLUX-style autoencoders in the pretrained stage-1 tests; and the places a user keeps them: an S3 prefix
and the local Hugging Face cache. Beside them, autoencoders of known quality for the fidelity check: pixel-space
ones (exact, slightly noisy, slightly blurry) and one that decodes red as yellow."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn
from torch.nn import functional as F

from ldm_core import storage
from ldm_core.data.synthetic import COLORS

# three levels (4x downsampling) of widths 16/32/32: the `tiny` preset's shape, so 32 px images give 8x8 latents
BLOCKS = (16, 32, 32)


def save_tiny_autoencoder_kl(
    folder: Path,
    latent_channels: int = 4,
    seed: int = 0,
    scaling_factor: float = 0.5,
    shift_factor: float | None = None,
) -> Path:
    torch.manual_seed(seed)
    model = AutoencoderKL(
        block_out_channels=BLOCKS,
        down_block_types=("DownEncoderBlock2D",) * len(BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(BLOCKS),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )
    model.save_pretrained(folder)
    return folder


def upload_folder(folder: Path, url: str) -> str:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            storage.write_bytes_atomic(storage.join(url, str(path.relative_to(folder))), path.read_bytes())
    return url


def fake_hf_cache(cache: Path, repo_id: str, folder: Path, subfolder: str) -> Path:
    """``folder`` as ``subfolder`` of a snapshot of ``repo_id`` in a Hugging Face hub cache laid out as
    ``huggingface_hub`` writes it (``models--owner--name/refs/main`` naming ``snapshots/<commit>``)."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    target = repo / "snapshots" / commit / subfolder
    target.mkdir(parents=True)
    for path in folder.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return cache


class PixelAutoencoder(nn.Module):
    """An autoencoder of known quality: the latent is the image itself; the decoder blurs it with a Gaussian of
    ``blur_sigma`` pixels (0: exact) and adds fixed noise of ``noise_std`` levels (0–255 scale)."""

    def __init__(self, blur_sigma: float = 0.0, noise_std: float = 0.0, seed: int = 0):
        super().__init__()
        self.noise_std, self.seed = noise_std, seed
        radius = max(1, int(round(3 * blur_sigma)))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-(x**2) / (2 * blur_sigma**2)) if blur_sigma > 0 else (x == 0).float()
        k = k / k.sum()
        self.register_buffer("kernel", (k[:, None] * k[None, :]).expand(3, 1, -1, -1).contiguous())  # (3, 1, k, k)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        pad = self.kernel.shape[-1] // 2
        x = F.conv2d(F.pad(z, (pad,) * 4, mode="replicate"), self.kernel, groups=3)  # (B, 3, H, W)
        if self.noise_std:
            g = torch.Generator().manual_seed(self.seed)
            x = x + torch.randn(x.shape, generator=g) * (self.noise_std / 127.5)
        return x.clamp(-1, 1)


class RedDecodedAsYellow(nn.Module):
    """An autoencoder whose decoder paints red pixels yellow (every other colour untouched)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        red, yellow = (torch.tensor(COLORS[c], dtype=torch.float32) / 127.5 - 1 for c in ("red", "yellow"))
        self.register_buffer("red", red.view(1, 3, 1, 1))
        self.register_buffer("shift", (yellow - red).view(1, 3, 1, 1))

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_latents(x)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        x = self.model.decode_latents(z)  # (B, 3, H, W) in [-1, 1]
        # red coverage of each pixel: 1 on red, 0 at the background's distance from red and beyond
        distance = (x - self.red).norm(dim=1, keepdim=True)  # (B, 1, H, W)
        weight = (1 - distance / 1.2).clamp(0, 1)
        return x + weight * self.shift
