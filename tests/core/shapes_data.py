"""The embedded shapes as an in-memory dataset with its attribute rows (what ImageShardDataset gives on disk)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ldm_core.data.synthetic import render_shape, shape_specs


class ShapesInMemory(torch.utils.data.Dataset):
    """``n`` shape images (deterministic from ``seed``) in [−1, 1], with ``rows`` carrying caption and attributes."""

    attribute_names = ["color", "shape", "size", "position"]

    def __init__(self, n: int, seed: int, size: int = 32):
        self.specs = shape_specs(n, seed)
        pixels = np.stack([np.asarray(render_shape(s, size)) for s in self.specs])  # (N, H, W, 3) uint8
        self.images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W)

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]

    def get_batch(self, indices: Sequence[int]) -> torch.Tensor:
        return self.images[list(indices)]

    def rows(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [{"caption": self.specs[i].caption, **self.specs[i].attributes} for i in indices]
