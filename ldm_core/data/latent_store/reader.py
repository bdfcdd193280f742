"""Reading a latent store: its metadata, its shards by split, the rows a trainer asks for."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ldm_core import storage
from ldm_core.data.latent_store.backends import SHARD_FORMATS, from_storage
from ldm_core.data.latent_store.schema import (
    METADATA_NAME,
    SHARDS_DIR,
    TRAINING_FIELDS,
    StoreShard,
    read_metadata,
    read_uncond,
)

log = logging.getLogger(__name__)

ROW_FIELDS = ("id", "caption", "split", "attributes")


class LatentStore:
    """An encoded store, opened for reading. Shards are numbered 0… in metadata order (empty ones skipped);
    rows are numbered globally, shard by shard, train rows before validation rows within each shard.

    ``read_shard(k)`` gives tensors in the storage dtype, unscaled; `LatentDataset` is the fast, cached,
    training-ready view (scaled latents, float32).

    The first read of each field of a shard in this object checks its files against the sha256s recorded when the
    shard was written and raises `CorruptShardError` (naming the shard and its URL) when they differ: training
    stops rather than skip data, or learn from flipped bits. A store of another format is refused on open
    (`LatentStoreFormatError`).
    """

    def __init__(self, store_url: str, storage_options: dict[str, Any] | None = None):
        self.url, self.storage_options = store_url, storage_options
        meta = read_metadata(store_url, storage_options)
        if meta is None:
            raise FileNotFoundError(f"no {METADATA_NAME} under {store_url}: encode a dataset there first")
        self.metadata = meta
        self.format = SHARD_FORMATS[meta.backend]
        self.shards: list[StoreShard] = [s for s in meta.shards if s.rows > 0]
        self.offsets = np.cumsum([0] + [s.rows for s in self.shards])
        self._uncond: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._verified: set[tuple[int, str]] = set()  # (shard, field) whose files this object has checked

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.num_rows

    @property
    def scale(self) -> tuple[float, float]:
        """(scaling_factor, shift_factor) for `scale_latents` / `unscale_latents`."""
        return self.metadata.scaling_factor, self.metadata.shift_factor

    @property
    def tensor_fields(self) -> tuple[str, ...]:
        """Every tensor field this store holds."""
        return TRAINING_FIELDS + (("logvar",) if self.metadata.content == "moments" else ())

    def uncond(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The empty prompt: (context (1, L, D) float32, mask (1, L) bool, pooled (1, D_pool) float32), for
        classifier-free guidance training."""
        if self._uncond is None:
            context, mask, pooled = read_uncond(self.url, self.storage_options)
            self._uncond = (context, mask, pooled)
        return self._uncond

    def shard_url(self, k: int) -> str:
        return storage.join(self.url, SHARDS_DIR, self.shards[k].name)

    def read_shard(self, k: int, fields: Sequence[str] = TRAINING_FIELDS) -> dict[str, torch.Tensor]:
        """Tensors of shard ``k``, storage dtype, unscaled: latents/logvar (N, C, h, w), context (N, L, D),
        context_mask (N, L) bool, pooled (N, D_pool)."""
        if "logvar" in fields and self.metadata.content != "moments":
            raise ValueError("this store holds posterior samples, not moments: it has no logvar")
        arrays = self.format.read(self.shard_url(k), fields, self.storage_options, self._to_verify(k, fields))
        self._verified.update((k, f) for f in fields)
        return {
            f: torch.from_numpy(a) if f == "context_mask" else from_storage(a, self.metadata.dtype)
            for f, a in arrays.items()
        }

    def _to_verify(self, k: int, fields: Sequence[str]) -> dict[str, str] | None:
        """The shard's checksums when some of ``fields`` is read from it for the first time, else None (the files
        this object has checked are not hashed again)."""
        return self.shards[k].checksums if any((k, f) not in self._verified for f in fields) else None

    def read_rows(self, k: int) -> list[dict[str, Any]]:
        """id, caption, split and every attribute column (None where a shard lacks one) of shard ``k``'s rows."""
        rows = self.format.read_rows(self.shard_url(k), self.storage_options, self._to_verify(k, ROW_FIELDS))
        self._verified.update((k, f) for f in ROW_FIELDS)
        for r in rows:
            for a in self.metadata.attribute_columns:
                r.setdefault(a, None)
        return rows

    def locate(self, i: int) -> tuple[int, int]:
        """Global row ``i`` -> (shard, row within the shard)."""
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} out of range for a store of {self.num_rows} rows")
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return k, i - int(self.offsets[k])

    def row(self, i: int) -> dict[str, Any]:
        """Everything stored for global row ``i`` (reads its shard; use `LatentDataset` for repeated access)."""
        k, j = self.locate(i)
        tensors = self.read_shard(k, self.tensor_fields)
        return {**self.read_rows(k)[j], **{f: t[j] for f, t in tensors.items()}}
