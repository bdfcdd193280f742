"""An in-memory dataset with the same interface as the on-disk ones (``__getitem__`` and ``get_batch``).

Tests and small experiments feed trainers through it; the trainers cannot tell it from a shard or latent store.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class InMemoryDataset(torch.utils.data.Dataset):
    """Columns of equal length; one column → items/batches are tensors, several → dicts of tensors."""

    def __init__(self, **columns: torch.Tensor):
        if not columns:
            raise ValueError("InMemoryDataset needs at least one column")
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"columns differ in length: {lengths}")
        self.columns = columns
        self._single = next(iter(columns)) if len(columns) == 1 else None

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int):
        if self._single:
            return self.columns[self._single][i]
        return {k: v[i] for k, v in self.columns.items()}

    def get_batch(self, indices: Sequence[int]):
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if self._single:
            return self.columns[self._single].index_select(0, idx)
        return {k: v.index_select(0, idx) for k, v in self.columns.items()}
