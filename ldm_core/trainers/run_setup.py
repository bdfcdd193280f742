"""The run setup both trainers share. Before a trainer builds anything: the device and precision, this process's place
among the ranks, the split of the global batch (batch_size = micro_batch_size × accumulation steps × world size),
and the trainer's own generator, seeded alike on every rank (`RunSetup`). Once it has built its parts: what a
checkpoint holds of them (`checkpointed_parts`), and the start every rank waits for before the first step, where
rank 0 reports the run's config (`start_run`)."""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ldm_core import distributed
from ldm_core.checkpoint import CheckpointManager
from ldm_core.config import flatten_dict
from ldm_core.distributed import BatchShard
from ldm_core.sharded_checkpoint import ShardedCheckpointManager
from ldm_core.tracking import Tracker
from ldm_core.trainers.config import Precision, TrainerConfig
from ldm_core.trainers.data_order import EpochBatchSampler
from ldm_core.trainers.step import LossScaler

log = logging.getLogger(__name__)


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; anything else is passed to torch.device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """'auto' means bf16 where the device computes it natively (CUDA with bf16 support, CPU), else fp32."""
    if precision != "auto":
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            log.warning("bf16 requested but unsupported on %s; using fp32", device)
            return "fp32"
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; parameters and optimizer state stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def split_global_batch(batch_size: int, micro_batch_size: int | None, world_size: int) -> tuple[int, int]:
    """(micro-batch per process per forward, accumulation steps) for a global batch over ``world_size`` processes.

    The global batch is the config's; the rest derives from it. micro_batch_size None means one forward per
    process per step (no accumulation). Anything that does not divide exactly is an error, never a silent rounding.
    """
    if batch_size % world_size:
        raise ValueError(
            f"trainer.batch_size {batch_size} (the global batch) is not divisible by the {world_size} "
            f"processes; use a multiple of {world_size}"
        )
    per_rank = batch_size // world_size
    micro = micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(
            f"trainer.batch_size {batch_size} must equal micro_batch_size × accumulation × processes: "
            f"{world_size} processes get {per_rank} each, which is not a multiple of micro_batch_size "
            f"{micro}; use a batch_size that is a multiple of {micro * world_size}"
        )
    return micro, per_rank // micro


def seed_everything(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Seeds the global RNGs and returns the trainer's own generator on ``device`` (the one every draw uses)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class RunSetup:
    """What every trainer derives from its config before it builds anything: the device and precision, this
    process's place among the ranks, the split of the global batch, and the trainer's generator (seeded alike on
    every rank, so initial weights are identical and every draw is made for the global batch)."""

    device: torch.device
    precision: str
    rank: int
    world_size: int
    shard: BatchShard
    micro: int
    """Micro-batch per process per forward."""
    accum: int
    """Accumulation steps per optimizer step."""
    gen: torch.Generator

    @classmethod
    def create(cls, tc: TrainerConfig, rank: int | None, world_size: int | None) -> RunSetup:
        device = resolve_device(tc.device)
        precision = resolve_precision(tc.precision, device)
        rank, world_size = distributed.resolve_world(rank, world_size)
        micro, accum = split_global_batch(tc.batch_size, tc.micro_batch_size, world_size)
        return cls(
            device,
            precision,
            rank,
            world_size,
            BatchShard(rank, world_size),
            micro,
            accum,
            seed_everything(tc.seed, device),
        )

    def sampler(self, num_items: int, seed: int) -> EpochBatchSampler:
        """This rank's share of every global micro-batch, epoch after epoch."""
        return EpochBatchSampler(
            num_items, self.micro * self.world_size, seed=seed, rank=self.rank, world_size=self.world_size
        )

    def checkpoints(
        self,
        tc: TrainerConfig,
        checkpoint_dir: str | None,
        storage_options: dict[str, Any] | None,
        sharded: bool = False,
    ) -> CheckpointManager | ShardedCheckpointManager | None:
        """The run's checkpoint directory: one file per step written by rank 0, or (``sharded``, strategy fsdp) DCP
        checkpoints every rank writes its shards of."""
        if not checkpoint_dir:
            return None
        manager = ShardedCheckpointManager if sharded else CheckpointManager
        return manager(checkpoint_dir, keep=tc.keep_checkpoints, storage_options=storage_options)


def checkpointed_parts(trained: dict[str, Any], ema: Any | None, scalers: dict[str, LossScaler]) -> dict[str, Any]:
    """What a checkpoint saves of a trainer's parts: its modules and optimizers (``trained``), its EMA when it keeps
    one, and its loss scales only when they scale (fp16), so that other precisions' checkpoints hold no scaler."""
    parts = dict(trained)
    if ema is not None:
        parts["ema"] = ema
    if any(scaler.enabled for scaler in scalers.values()):
        parts.update(scalers)
    return parts


def start_run(tracker: Tracker, run: RunSetup, config: dict[str, Any], resumed_from: int | None, **params: Any) -> None:
    """Called once the trainer is ready to step: every rank waits here, then rank 0 reports the run's config with
    ``params`` (what the trainer adds) to the tracker.

    The barrier keeps every rank (and rank 0's first checkpoint) from starting before every rank has read the
    checkpoint it resumes from. Every run reports, a resumed one too: trackers open a new run per attempt.
    """
    distributed.barrier()
    if run.rank == 0:
        tracker.log_params(
            {
                **flatten_dict(config),
                **params,
                "device": str(run.device),
                "precision": run.precision,
                "world_size": run.world_size,
                "resumed_from_step": resumed_from or 0,
            }
        )
