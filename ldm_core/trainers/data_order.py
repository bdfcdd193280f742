"""The order the trainers see the data in: shuffled batches that are a pure function of (seed, epoch), each rank's
slice of every global batch, and the position inside the epoch, which a checkpoint records so that a resumed run
draws exactly the batches an uninterrupted one would."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DataPosition:
    """Where the next micro-batch comes from: epoch, and index of the batch within that epoch."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}


class EpochBatchSampler:
    """Shuffled batches whose order is a pure function of (seed, epoch); each rank takes a disjoint slice.

    The global batch is split across ``world_size`` ranks: rank r takes items [r::world_size] of every global batch,
    so the union over ranks of one step equals the single-process batch of the same global size.
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ):
        if num_items < batch_size:
            raise ValueError(f"dataset has {num_items} items, fewer than one batch of {batch_size}")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by world size {world_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.batch_size  # drop the ragged tail: every step sees a full batch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        out = []
        for b in range(self.batches_per_epoch):
            global_batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            out.append(global_batch[self.rank :: self.world_size])
        return out

    def iterate(self, start: DataPosition) -> Iterator[tuple[DataPosition, list[int]]]:
        """Yields (position of this batch, indices) forever, starting at ``start``."""
        epoch, b = start.epoch, start.batch
        while True:
            batches = self.epoch_batches(epoch)
            for i in range(b, len(batches)):
                yield DataPosition(epoch, i), batches[i]
            epoch, b = epoch + 1, 0


def _next_position(pos: DataPosition, batches_per_epoch: int) -> DataPosition:
    return (
        DataPosition(pos.epoch + 1, 0) if pos.batch + 1 >= batches_per_epoch else DataPosition(pos.epoch, pos.batch + 1)
    )


class BatchStream:
    """Batches from a map-style dataset in the sampler's order, optionally loaded by worker processes.

    ``position`` is always the position of the *next* batch to be returned, which is what a checkpoint records.
    Workers (when ``num_workers`` > 0) prefetch ahead, so data loading overlaps compute; the order is unchanged.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        sampler: EpochBatchSampler,
        start: DataPosition,
        collate: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
    ):
        self.dataset, self.sampler = dataset, sampler
        self.collate = collate or torch.utils.data.default_collate
        self.num_workers = num_workers
        self.position = DataPosition(start.epoch, start.batch)
        self._it: Iterator[Any] | None = None
        self._epoch_of_it = -1

    def _open_epoch(self) -> None:
        batches = self.sampler.epoch_batches(self.position.epoch)[self.position.batch :]
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if (
            set_epoch is not None
        ):  # datasets whose items are drawn per epoch (posterior samples): before workers copy it
            set_epoch(self.position.epoch)
        fetch = getattr(self.dataset, "get_batch", None)
        if self.num_workers == 0:
            if fetch is not None:  # datasets that can gather a batch in one call (in-memory tensors, latent stores)
                self._it = (fetch(b) for b in batches)
            else:
                self._it = (self.collate([self.dataset[i] for i in b]) for b in batches)
        else:
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=batches,
                collate_fn=self.collate,
                num_workers=self.num_workers,
                persistent_workers=False,
                prefetch_factor=4,
            )
            self._it = iter(loader)
        self._epoch_of_it = self.position.epoch

    def next(self) -> Any:
        if self._it is None or self._epoch_of_it != self.position.epoch:
            self._open_epoch()
        try:
            batch = next(self._it)  # type: ignore[arg-type]
        except StopIteration:
            self.position = DataPosition(self.position.epoch + 1, 0)
            self._open_epoch()
            batch = next(self._it)  # type: ignore[arg-type]
        self.position = _next_position(self.position, self.sampler.batches_per_epoch)
        return batch
