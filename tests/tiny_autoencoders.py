"""Tiny diffusers AutoencoderKLs saved as the Hub ships them (``save_pretrained``), standing in for SD's kl-f8 and
16-channel SD3/FLUX-style autoencoders in the pretrained stage-1 tests; and the places a user keeps them: an S3 prefix
and the local Hugging Face cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ldm_core import storage

# three levels (4x downsampling) of widths 16/32/32: the `tiny` preset's shape, so 32 px images give 8x8 latents
BLOCKS = (16, 32, 32)


def save_tiny_autoencoder_kl(folder: Path, latent_channels: int = 4, seed: int = 0, scaling_factor: float = 0.5,
                             shift_factor: float | None = None) -> Path:
    torch.manual_seed(seed)
    model = AutoencoderKL(
        block_out_channels=BLOCKS, down_block_types=("DownEncoderBlock2D",) * len(BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(BLOCKS), layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=8, sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor,
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
