"""The training view of a latent store: a map-style torch Dataset whose ``get_batch`` is what `train_ldm` reads.

``get_batch(indices)`` -> {"latents": (B, C, h, w) float32 in diffusion space (scaled by `scale_latents`),
"context": (B, L, D) float32, "context_mask": (B, L) bool, "pooled": (B, D_pool) float32}. A store of moments gives
the posterior mean (the default), or with ``sample_posterior=True`` a draw
from N(mean, exp(logvar)), as SD-1 (CompVis ``get_first_stage_encoding``) and diffusers' ``train_text_to_image.py``
(``latent_dist.sample()``) train: a fresh draw every time an image is seen. The noise is a pure function of (seed,
epoch, row), and the trainer's batch stream sets the epoch (`set_epoch`): each epoch draws anew, and a resumed run
gets the same batch at the same step, bit for bit.

Speed comes from never touching storage on the hot path:

- Resident (the store's split fits ``max_cache_bytes``, the usual case: 100k SD-size rows are ~15 GB in fp16, a
  demo store a few MB): one tensor per field holds every row in the storage dtype; a batch is one ``index_select``.
  Shards are loaded into it by background threads from the first access on, the shards the current batch needs
  first; a batch waits only for its own shards.
- Streaming (larger stores): an LRU of decoded shards; the shards of a batch are fetched concurrently, and the
  next ``prefetch`` shards in store order are read ahead (sequential or shard-blocked orders never wait). A fully
  random order over a store larger than memory would fetch a shard per row; `prefetch_rows(indices)` lets a
  caller that knows its upcoming batches schedule them ahead.

Local paths and ``s3://`` URLs behave the same. DataLoader workers each get their own empty cache.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm_core.data import canonical
from ldm_core.data.latent_store.backends import TORCH_DTYPE, numpy_view
from ldm_core.data.latent_store.reader import LatentStore
from ldm_core.data.latent_store.schema import TRAINING_FIELDS
from ldm_core.models.autoencoder import scale_latents

log = logging.getLogger(__name__)

DEFAULT_MAX_CACHE_BYTES = 8 * 2**30
_IDLE_EXIT_S = 5.0  # a loader thread with nothing to do for this long exits (a new one starts on demand)


class LatentDataset(Dataset):
    """The rows of one split of a latent store, for the LDM trainer (``get_batch``) and evaluation (``rows``).

    split: ``"train"``, ``"validation"`` or None (every row). cache: keep decoded shards in memory (the whole
    split when it fits ``max_cache_bytes``, else an LRU of shards); False reads the shards of every batch again.
    prefetch: background loader threads, and shards read ahead in streaming mode (0: load in the caller).
    sample_posterior: draw latents from the stored posterior (moments stores) instead of returning its mean.
    """

    def __init__(
        self,
        store_url: str,
        split: str | None = "train",
        storage_options: dict[str, Any] | None = None,
        cache: bool = True,
        prefetch: int = 4,
        *,
        max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
        sample_posterior: bool = False,
        seed: int = 0,
    ) -> None:
        if split is not None and split not in canonical.SPLITS:
            raise ValueError(f"split must be one of {canonical.SPLITS} or None, got {split!r}")
        self.store = LatentStore(store_url, storage_options)
        meta = self.store.metadata
        if sample_posterior and meta.content != "moments":
            raise ValueError("sample_posterior needs a store of posterior moments; this one holds samples")
        self.split, self.cache, self.prefetch = split, cache, max(0, int(prefetch))
        self.sample_posterior, self.seed, self.epoch = sample_posterior, seed, 0
        self.scaling_factor, self.shift_factor = meta.scaling_factor, meta.shift_factor
        self.latent_shape, self.context_shape = tuple(meta.latent_shape), tuple(meta.context_shape)
        self.pooled_dim = meta.pooled_dim
        self.fields = TRAINING_FIELDS + (("logvar",) if sample_posterior else ())
        # the split is a contiguous range of every shard (train rows first): (store shard, first row, rows)
        self._parts: list[tuple[int, int, int]] = []
        for k, s in enumerate(self.store.shards):
            ranges = {"train": (0, s.train_rows), "validation": (s.train_rows, s.validation_rows), None: (0, s.rows)}
            lo, n = ranges[split]
            if n:
                self._parts.append((k, lo, n))
        self._starts = np.cumsum([0] + [n for _, _, n in self._parts])
        self._dtype = TORCH_DTYPE[meta.dtype]
        itemsize = torch.empty((), dtype=self._dtype).element_size()
        c, h, w = self.latent_shape
        L, D = self.context_shape
        self.row_bytes = (c * h * w * (2 if sample_posterior else 1) + L * D + self.pooled_dim) * itemsize + L
        largest = max((n for _, _, n in self._parts), default=0)
        self.resident = cache and len(self) * self.row_bytes <= max_cache_bytes
        self.max_cached_shards = (
            0
            if not cache
            else len(self._parts)
            if self.resident
            else max(1, max_cache_bytes // max(1, largest * self.row_bytes))
        )
        self._rows: dict[int, list[dict[str, Any]]] = {}
        self._init_runtime()

    # -- runtime state (not pickled: each DataLoader worker builds its own) ------------------------------------

    def _init_runtime(self) -> None:
        self._cv = threading.Condition()
        self._state: dict[int, str] = {}  # part -> "queued" | "loading" | "ready"
        self._errors: dict[int, BaseException] = {}
        self._queue: collections.deque[int] = collections.deque()
        self._lru: collections.OrderedDict[int, dict[str, torch.Tensor]] = collections.OrderedDict()
        self._pins: collections.Counter[int] = collections.Counter()
        self._resident: dict[str, torch.Tensor] | None = None
        self._all_ready = False
        self._threads: list[threading.Thread] = []
        self._closed = False

    def __getstate__(self) -> dict[str, Any]:
        state = {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("_cv", "_state", "_errors", "_queue", "_lru", "_pins", "_resident", "_threads")
        }
        state["_rows"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def close(self) -> None:
        """Stop the loader threads (they are daemons: an unclosed dataset never blocks interpreter exit)."""
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()

    # -- sizes and metadata -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def metadata(self):
        return self.store.metadata

    def uncond(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The empty prompt (context (1, L, D) float32, mask (1, L) bool, pooled (1, D_pool) float32):
        ``train_ldm(..., uncond=…)``."""
        return self.store.uncond()

    def set_epoch(self, epoch: int) -> None:
        """With ``sample_posterior``: draw fresh posterior noise per epoch (the noise is a function of it)."""
        self.epoch = int(epoch)

    def _locate(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """indices -> (checked indices, part of each, row of each within its part)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for a dataset of {n} rows")
        idx = idx % max(n, 1)
        part = np.searchsorted(self._starts, idx, side="right") - 1
        return idx, part, idx - self._starts[part]

    # -- loading ------------------------------------------------------------------------------------------------

    def _load(self, p: int) -> dict[str, torch.Tensor] | None:
        """Read part ``p`` from storage; resident: copy it into its slot and return None; else return its tensors.

        Runs in the loader threads, so it copies with NumPy and calls no torch op that can open a parallel region:
        a torch op on a large tensor in a second thread gives that thread an OpenMP team of its own, libgomp then
        counts more threads than cores and throttles its spin-wait for the whole process, and every small op of the
        training step pays a futex wake, which slows the step for as long as those threads live
        (tests/core/test_latent_store.py::test_loader_threads_call_no_torch_op_that_computes holds the loader to this).
        """
        k, lo, n = self._parts[p]
        tensors = self.store.read_shard(k, self.fields)
        whole = lo == 0 and n == self.store.shards[k].rows
        tensors = {
            f: t if whole else torch.from_numpy(numpy_view(t)[lo : lo + n].copy()).view(t.dtype)
            for f, t in tensors.items()
        }
        if self._resident is not None:
            s = int(self._starts[p])
            for f, t in tensors.items():
                numpy_view(self._resident[f])[s : s + n] = numpy_view(t)
            return None
        return tensors

    def _ensure_threads(self) -> None:
        # lock held; threads exit after a few idle seconds, so finished or forgotten datasets hold no threads
        while self.prefetch and len(self._threads) < self.prefetch and not self._closed:
            t = threading.Thread(target=self._worker, name="latent-prefetch", daemon=True)
            self._threads.append(t)
            t.start()

    def _worker(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    if not self._cv.wait(timeout=_IDLE_EXIT_S) and not self._queue:
                        self._threads.remove(me)
                        return
                if self._closed:
                    self._threads.remove(me)
                    return
                p = self._queue.popleft()
                if self._state.get(p) != "queued":
                    continue
                self._state[p] = "loading"
            self._run_load(p)

    def _run_load(self, p: int) -> None:
        try:
            tensors = self._load(p)
        except BaseException as e:  # surfaced to the caller that needs this shard
            with self._cv:
                self._state.pop(p, None)
                self._errors[p] = e
                self._cv.notify_all()
            return
        with self._cv:
            self._state[p] = "ready"
            if tensors is not None:
                self._lru[p] = tensors
                self._evict()
            self._cv.notify_all()

    def _evict(self) -> None:
        # called with the lock held; shards a get_batch is waiting for are pinned
        for p in list(self._lru):
            if len(self._lru) <= self.max_cached_shards:
                break
            if not self._pins[p]:
                del self._lru[p]
                self._state.pop(p, None)

    def _schedule(self, parts: Iterable[int], urgent: bool) -> None:
        """Queue loads (lock held). Urgent ones go to the front, in order."""
        new = [p for p in parts if p not in self._state]
        for p in new:
            self._state[p] = "queued"
        if urgent:
            urgent_parts = [p for p in parts if self._state.get(p) == "queued"]
            for p in urgent_parts:
                try:
                    self._queue.remove(p)
                except ValueError:
                    pass
            self._queue.extendleft(reversed(urgent_parts))
        else:
            self._queue.extend(new)
        self._cv.notify_all()

    def _acquire(self, parts: Sequence[int]) -> dict[int, dict[str, torch.Tensor]]:
        """Wait until these parts are loaded; streaming mode: return their tensors (pinned while we wait)."""
        if self._resident is None and self.resident:
            with self._cv:
                if self._resident is None:
                    n = len(self)
                    c, h, w = self.latent_shape
                    L, D = self.context_shape
                    shapes = {
                        "latents": (n, c, h, w),
                        "logvar": (n, c, h, w),
                        "context": (n, L, D),
                        "context_mask": (n, L),
                        "pooled": (n, self.pooled_dim),
                    }
                    self._resident = {
                        f: torch.empty(shapes[f], dtype=torch.bool if f == "context_mask" else self._dtype)
                        for f in self.fields
                    }
                    if self.prefetch:  # warm the whole split in the background, in store order
                        self._ensure_threads()
                        self._schedule(range(len(self._parts)), urgent=False)
        with self._cv:
            for p in parts:
                self._pins[p] += 1
                self._errors.pop(p, None)  # a failed background read is retried once it is needed
            try:
                if self.prefetch:
                    self._ensure_threads()
                    self._schedule(parts, urgent=True)
                    ahead = min(self.prefetch, self.max_cached_shards - len(parts))
                    if not self.resident and ahead > 0:  # read ahead in store order
                        last = max(parts, default=-1)
                        self._schedule(range(last + 1, min(last + 1 + ahead, len(self._parts))), urgent=False)
                while True:
                    for p in parts:
                        if p in self._errors:
                            raise self._errors.pop(p)
                    pending = [p for p in parts if self._state.get(p) != "ready"]
                    if not pending:
                        break
                    if not self.prefetch:
                        p = pending[0]
                        self._state[p] = "loading"
                        self._cv.release()
                        try:
                            self._run_load(p)
                        finally:
                            self._cv.acquire()
                    else:
                        self._schedule(pending, urgent=True)  # e.g. evicted meanwhile
                        self._cv.wait()
                out = {} if self._resident is not None else {p: self._lru[p] for p in parts}
                for p in parts:
                    if p in self._lru:
                        self._lru.move_to_end(p)
            finally:
                for p in parts:
                    self._pins[p] -= 1
                self._evict()
            return out

    def prefetch_rows(self, indices: Sequence[int]) -> None:
        """Start loading the shards of these rows in the background (for a caller that knows what comes next)."""
        _, part, _ = self._locate(indices)
        with self._cv:
            if self.prefetch:
                self._ensure_threads()
                self._schedule([int(p) for p in np.unique(part)], urgent=False)

    # -- the training interface ---------------------------------------------------------------------------------

    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """{"latents": (B, C, h, w) float32 scaled, "context": (B, L, D) float32, "context_mask": (B, L) bool,
        "pooled": (B, D_pool) float32}."""
        idx, part, local = self._locate(indices)
        needed = [int(p) for p in np.unique(part)]
        if not self._all_ready:
            tensors = self._acquire(needed)
            if (
                self._resident is not None
                and len(self._state) == len(self._parts)
                and all(s == "ready" for s in self._state.values())
            ):
                self._all_ready = True
        else:
            tensors = {}
        if self._resident is not None:
            it = torch.from_numpy(idx)
            raw = {f: t.index_select(0, it) for f, t in self._resident.items()}
        else:
            raw = (
                {f: torch.empty((len(idx), *t.shape[1:]), dtype=t.dtype) for f, t in tensors[needed[0]].items()}
                if needed
                else {}
            )
            for p in needed:
                sel = torch.from_numpy(np.nonzero(part == p)[0])
                rows = torch.from_numpy(local[part == p])
                for f, t in tensors[p].items():
                    raw[f][sel] = t.index_select(0, rows)
            if not needed:
                c, h, w = self.latent_shape
                L, D = self.context_shape
                raw = {
                    "latents": torch.empty(0, c, h, w),
                    "context": torch.empty(0, L, D),
                    "context_mask": torch.empty(0, L, dtype=torch.bool),
                    "pooled": torch.empty(0, self.pooled_dim),
                }
        z = raw["latents"].float()  # (B, C, h, w), autoencoder space
        if self.sample_posterior:
            z = z + torch.exp(0.5 * raw["logvar"].float()) * self._posterior_noise(idx, z.shape[1:])
        return {
            "latents": scale_latents(z, self.scaling_factor, self.shift_factor),
            "context": raw["context"].float(),
            "context_mask": raw["context_mask"].bool(),
            "pooled": raw["pooled"].float(),  # (B, D_pool)
        }

    def _posterior_noise(self, idx: np.ndarray, shape: torch.Size) -> torch.Tensor:
        # one generator per row, seeded by (seed, epoch, row): independent of batch composition and of the past
        g = torch.Generator()
        out = torch.empty((len(idx), *shape))
        for b, i in enumerate(idx.tolist()):
            g.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + i) % 2**63)
            out[b] = torch.randn(shape, generator=g)
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Row ``i``: {"latents": (C, h, w), "context": (L, D), "context_mask": (L,), "pooled": (D_pool,)} (collates
        like get_batch)."""
        return {k: v[0] for k, v in self.get_batch([int(i)]).items()}

    def rows(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """id, caption, split and attribute columns of these rows (for evaluation prompts and grouping)."""
        _, part, local = self._locate(indices)
        out = []
        for p, j in zip(part.tolist(), local.tolist()):
            if p not in self._rows:
                k, lo, n = self._parts[p]
                self._rows[p] = self.store.read_rows(k)[lo : lo + n]
            out.append(dict(self._rows[p][j]))
        return out


__all__ = ["LatentDataset", "DEFAULT_MAX_CACHE_BYTES"]
