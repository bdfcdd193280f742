"""Turning image tensors into uint8 arrays and grids, for trackers, reports and `ldm sample`."""

from __future__ import annotations

import math

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [−1, 1] → (B, H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile (N, H, W, 3) uint8 images into one (rows·(H+pad)+pad, cols·(W+pad)+pad, 3) image."""
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def upscale_nearest(image: np.ndarray, factor: int) -> np.ndarray:
    """Blow up a small image (e.g. 32×32 samples) so it is visible in a report or UI."""
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def reconstruction_grid(x: torch.Tensor, recon: torch.Tensor, max_items: int = 8) -> np.ndarray:
    """Originals on the top row, reconstructions below: (2H, n·W, 3) uint8."""
    a, b = to_uint8(x[:max_items]), to_uint8(recon[:max_items])
    return np.concatenate([np.concatenate(list(a), axis=1), np.concatenate(list(b), axis=1)], axis=0)
