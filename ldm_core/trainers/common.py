"""Machinery shared by the trainers: device/precision, deterministic resumable batch order, EMA, the NaN guard,
learning-rate schedule, RNG capture and the checkpoint state round trip.

Exact resume rests on three things: every random draw comes from RNG state that is checkpointed; the data order is
a pure function of (seed, epoch) and the position inside the epoch is checkpointed; and weights/optimizer state are
saved bit-exact (safetensors). A run killed after step k and resumed then replays steps k+1… exactly.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from ldm_core.checkpoint import CheckpointManager
from ldm_core.config import StrictModel

from ldm_core import distributed
from ldm_core.distributed import BatchShard

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]


# ---------------------------------------------------------------------------------------------------------------
# Device and precision
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# The global batch and its split: batch_size = micro_batch_size × accumulation steps × world size
# ---------------------------------------------------------------------------------------------------------------

def split_global_batch(batch_size: int, micro_batch_size: int | None, world_size: int) -> tuple[int, int]:
    """(micro-batch per process per forward, accumulation steps) for a global batch over ``world_size`` processes.

    The global batch is the config's; the rest derives from it. micro_batch_size None means one forward per
    process per step (no accumulation). Anything that does not divide exactly is an error, never a silent rounding.
    """
    if batch_size % world_size:
        raise ValueError(f"trainer.batch_size {batch_size} (the global batch) is not divisible by the {world_size} "
                         f"processes; use a multiple of {world_size}")
    per_rank = batch_size // world_size
    micro = micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(f"trainer.batch_size {batch_size} must equal micro_batch_size × accumulation × processes: "
                         f"{world_size} processes get {per_rank} each, which is not a multiple of micro_batch_size "
                         f"{micro}; use a batch_size that is a multiple of {micro * world_size}")
    return micro, per_rank // micro


# ---------------------------------------------------------------------------------------------------------------
# What every trainer's config has
# ---------------------------------------------------------------------------------------------------------------

class TrainerConfig(StrictModel):
    """The fields both trainers share (each stage's config adds its optimizer and its own options)."""

    steps: int = Field(1000, ge=1)
    """Optimizer steps to train for (total, across resumes)."""
    batch_size: int = Field(8, ge=1)
    """Global batch per optimizer step: micro_batch_size × grad_accum × world size."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Samples per forward pass on one process; None = the whole per-process batch (no accumulation). Accumulation
    steps derive from it: batch_size / (micro_batch_size × world size), which must divide exactly."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Max global gradient norm per optimizer; None disables clipping."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 to lr over this many steps."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After warmup: constant, or cosine decay to min_lr_ratio·lr at the last step."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Floor of the cosine schedule, as a fraction of lr."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision of the forward pass; "auto" = bf16 where the device has it."""
    device: str = "auto"
    """"auto" (CUDA if present, else CPU), or any torch device string."""
    checkpoint_every: int = Field(500, ge=1)
    """Write a resumable checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many checkpoints to keep; older ones are pruned after a newer one is committed."""
    max_nonfinite_steps: int = Field(10, ge=0)
    """Skip steps with a NaN/inf loss or gradient; stop the run once more than this many were skipped."""
    log_every: int = Field(10, ge=1)
    """Send step metrics to the tracker every N steps."""
    seed: int = 0
    """Seeds the data order and every random draw of the step (noise, times, posterior samples, caption dropout)."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes that load ahead of the step (0 = load in the training process)."""
    channels_last: bool = False
    """Run convolutions in channels_last memory format (NHWC: what tensor cores and oneDNN prefer)."""
    compile: bool = False
    """torch.compile the model for training (Inductor): worth it on GPUs for long runs; the first steps pay the
    compilation (minutes on a 2-core CPU, where eager is usually as fast)."""

    @model_validator(mode="after")
    def _check_batch(self) -> "TrainerConfig":
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")
        return self


# ---------------------------------------------------------------------------------------------------------------
# Deterministic, resumable batch order
# ---------------------------------------------------------------------------------------------------------------

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

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
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
    return DataPosition(pos.epoch + 1, 0) if pos.batch + 1 >= batches_per_epoch else DataPosition(pos.epoch, pos.batch + 1)


class BatchStream:
    """Batches from a map-style dataset in the sampler's order, optionally loaded by worker processes.

    ``position`` is always the position of the *next* batch to be returned, which is what a checkpoint records.
    Workers (when ``num_workers`` > 0) prefetch ahead, so data loading overlaps compute; the order is unchanged.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, sampler: EpochBatchSampler, start: DataPosition,
                 collate: Callable[[list[Any]], Any] | None = None, num_workers: int = 0):
        self.dataset, self.sampler = dataset, sampler
        self.collate = collate or torch.utils.data.default_collate
        self.num_workers = num_workers
        self.position = DataPosition(start.epoch, start.batch)
        self._it: Iterator[Any] | None = None
        self._epoch_of_it = -1

    def _open_epoch(self) -> None:
        batches = self.sampler.epoch_batches(self.position.epoch)[self.position.batch :]
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:  # datasets whose items are drawn per epoch (posterior samples): before workers copy it
            set_epoch(self.position.epoch)
        fetch = getattr(self.dataset, "get_batch", None)
        if self.num_workers == 0:
            if fetch is not None:  # datasets that can gather a batch in one call (in-memory tensors, latent stores)
                self._it = (fetch(b) for b in batches)
            else:
                self._it = (self.collate([self.dataset[i] for i in b]) for b in batches)
        else:
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=batches, collate_fn=self.collate, num_workers=self.num_workers,
                persistent_workers=False, prefetch_factor=4,
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


# ---------------------------------------------------------------------------------------------------------------
# EMA, NaN guard, LR schedule, gradient clipping
# ---------------------------------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of a module's parameters (buffers are copied): θ_ema ← d·θ_ema + (1−d)·θ."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, skip: torch.Tensor | None = None) -> None:
        """``skip``: a 0-d 0/1 tensor; 1 leaves the average unchanged (a skipped step), without a host sync."""
        ema_p = [p for p in self.model.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        weight = 1.0 - self.decay if skip is None else (1.0 - skip.to(ema_p[0].dtype)) * (1.0 - self.decay)
        torch._foreach_lerp_(ema_p, src_p, weight)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(sd)


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteGuard:
    """Skips steps whose loss or gradients are not finite, counts them, and stops the run after too many.

    Without host-device syncs in the step: `flag` computes a device-side 0/1 "found inf" (agreed over ranks by an
    all-reduce), `optimizer_step` hands it to the fused optimizer, which skips the update on the device, the EMA
    weighs its update by it, and `record` adds it to a device counter. The count is read (`skipped`), and the limit
    enforced (`enforce`), only when the trainer logs or checkpoints.
    """

    def __init__(self, max_skips: int):
        self.max_skips = max_skips
        self._base = 0  # skips before this process's counter (restored from a checkpoint)
        self._count: torch.Tensor | None = None
        self._reported = 0

    @staticmethod
    def flag(*values: torch.Tensor) -> torch.Tensor:
        """1.0 (a 0-d float tensor) when any value is not finite on any rank, else 0.0; no host sync."""
        bad = (~torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all()).float()
        return distributed.all_reduce_max(bad)

    def record(self, found_inf: torch.Tensor) -> None:
        self._count = found_inf.detach().clone() if self._count is None else self._count + found_inf

    @property
    def skipped(self) -> int:
        """Steps skipped so far (one host sync)."""
        return self._base + (int(self._count.item()) if self._count is not None else 0)

    @skipped.setter
    def skipped(self, value: int) -> None:
        self._base, self._count, self._reported = int(value), None, int(value)

    def enforce(self, step: int | None = None) -> int:
        """The count so far (warning about new skips); raises once it exceeds the limit, before anything else is
        written (the last checkpoint is intact)."""
        n = self.skipped
        if n > self._reported:
            log.warning("%d step(s) with a non-finite loss or gradient skipped%s (%d in all)", n - self._reported,
                        f" up to step {step}" if step is not None else "", n)
            self._reported = n
        if n > self.max_skips:
            raise NonFiniteLossError(
                f"{n} steps had a non-finite loss or gradient (limit {self.max_skips}); stopping. "
                "The last checkpoint written before this point is intact."
            )
        return n


class LossScaler:
    """fp16's dynamic loss scale for one optimizer (`torch.amp.GradScaler`); inert in every other precision.

    fp16 keeps 5 exponent bits, so gradients below its smallest subnormal flush to zero in the backward pass and the
    weights silently stop learning. The loss is multiplied by a large power of two before backward (`scaled`,
    `scale`) and the gradients are divided by it (`unscale`) before clipping and the step; a step whose scaled
    gradients overflow is skipped and the scale halved, and after ``growth_interval`` clean steps it doubles
    (`update`). Such a skip is the scaler finding its scale, not a failure: `nonfinite` counts it only once the scale
    is down to 1, where no smaller scale can help. The state (scale, growth tracker) goes into the checkpoint, so a
    resumed run scales as the uninterrupted one. bf16 has fp32's exponent range and needs none of this.
    """

    def __init__(self, precision: str, device: torch.device):
        self.enabled = precision == "fp16"
        self._scaler = torch.amp.GradScaler(device.type, enabled=self.enabled)
        self._one = torch.ones((), device=device)

    def scale(self) -> torch.Tensor | None:
        """The current loss scale, a 0-d device tensor (no host sync); None when disabled."""
        return self._scaler.scale(self._one) if self.enabled else None

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """scale · loss, to back-propagate (the loss itself when disabled)."""
        return self._scaler.scale(loss)

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the optimizer's gradients by the scale in place: clipping and the logged norm see true gradients."""
        self._scaler.unscale_(optimizer)

    def nonfinite(self, grad_norm: torch.Tensor, *losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(skip, count), 0-d 0/1 device tensors agreed over ranks: skip the step when a loss or the (unscaled)
        gradient norm is not finite; count it as a non-finite step (`NonFiniteGuard.record`) unless it is a gradient
        overflow at a scale above 1, which `update` cures by lowering the scale. Call before `update`."""
        if not self.enabled:
            skip = NonFiniteGuard.flag(grad_norm, *losses)
            return skip, skip
        grad_bad = NonFiniteGuard.flag(grad_norm)
        loss_bad = NonFiniteGuard.flag(*losses) if losses else torch.zeros_like(grad_bad)
        at_floor = (self.scale() <= 1.0).to(grad_bad.dtype)  # type: ignore[operator]
        return torch.maximum(loss_bad, grad_bad), torch.maximum(loss_bad, grad_bad * at_floor)

    def update(self) -> None:
        """Halve the scale after an overflow, or grow it after enough clean steps (after `unscale` this step)."""
        self._scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self._scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._scaler.load_state_dict(state)


def optimizer_step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """Step unless ``found_inf`` (0-d, 1.0 = skip). Fused optimizers skip on the device (no host sync), as under
    AMP's GradScaler; others read the flag."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = found_inf.to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(found_inf):
        optimizer.step()


def grad_norm_and_finite(params: Sequence[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Total gradient norm (inf/nan if any gradient is); clips in place when ``max_norm`` is set and finite."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if max_norm is not None and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(grads, max_norm, error_if_nonfinite=False, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in grads], foreach=True)


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, schedule: str = "constant",
          min_lr_ratio: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based)."""
    # 1) linear warmup from 0 to base_lr
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    # 2) constant after warmup
    if schedule == "constant":
        return base_lr
    # 3) cosine decay from base_lr to min_lr_ratio·base_lr over the remaining steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * coeff)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


# ---------------------------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------------------------

def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def seed_everything(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Seeds the global RNGs and returns the trainer's own generator on ``device`` (the one every draw uses)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Run state: what a checkpoint holds, and the resume that reverses it
# ---------------------------------------------------------------------------------------------------------------

class RunState:
    """The resumable state of one training run, in one place for every trainer.

    ``parts`` are named objects with ``state_dict``/``load_state_dict`` (modules, optimizers, EMA); the RNG, the
    data position, the step and the non-finite counter come along. ``model_config`` is compared on resume so a
    checkpoint is never loaded into a different architecture.
    """

    def __init__(self, run_config: dict[str, Any], model_key: str, parts: dict[str, Any],
                 generator: torch.Generator, guard: NonFiniteGuard):
        self.run_config, self.model_key = run_config, model_key
        self.parts, self.generator, self.guard = parts, generator, guard

    def snapshot(self, step: int, position: DataPosition) -> dict[str, Any]:
        return {
            "step": step, "position": position.to_dict(), "config": self.run_config,
            **{name: part.state_dict() for name, part in self.parts.items()},
            "rng": capture_rng(self.generator), "nonfinite_skipped": self.guard.skipped,
            "world_size": distributed.current().world_size,
        }

    def restore(self, state: dict[str, Any], where: str) -> tuple[int, DataPosition]:
        saved, ours = state["config"].get(self.model_key), self.run_config.get(self.model_key)
        if saved != ours:
            raise ValueError(f"the checkpoint in {where} was trained with a different {self.model_key} config; "
                             "point the checkpoint directory elsewhere to start a new run")
        for name, part in self.parts.items():
            if name not in state and isinstance(part, LossScaler):  # an fp16 checkpoint from before the scaler
                log.warning("the checkpoint in %s has no %s state: the fp16 loss scale starts afresh", where, name)
                continue
            part.load_state_dict(state[name])
        restore_rng(state["rng"], self.generator)
        self.guard.skipped = state["nonfinite_skipped"]
        saved_world, world = state.get("world_size", 1), distributed.current().world_size
        if saved_world != world:
            # the data position counts global micro-batches of micro_batch_size × world size: with the same
            # accumulation (e.g. micro_batch_size unset) the run continues exactly, otherwise only approximately
            log.warning("resuming a checkpoint written by %d processes with %d: the continuation is exact only if "
                        "the accumulation steps (batch_size / (micro_batch_size × processes)) are unchanged",
                        saved_world, world)
        return state["step"], DataPosition(**state["position"])


    def resume_latest(self, ckpt: CheckpointManager | None, where: str | None,
                      what: str) -> tuple[int, DataPosition, int | None]:
        """Loads the newest checkpoint in ``ckpt`` when there is one: (start step, data position, step resumed
        from or None for a fresh run)."""
        if ckpt is None or (latest := ckpt.load_latest()) is None:
            return 0, DataPosition(), None
        resumed_from, state = latest
        step, position = self.restore(state, str(where))
        log.info("resumed %s training from step %d (%s)", what, step, where)
        return step, position, resumed_from

    def save(self, ckpt: CheckpointManager | None, step: int, position: DataPosition, rank: int) -> None:
        """Checkpoints (rank 0 only), never past the non-finite limit: every rank raises alike before it."""
        self.guard.enforce(step)
        if ckpt is not None and rank == 0:
            ckpt.save(step, self.snapshot(step, position))


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
    def create(cls, tc: TrainerConfig, rank: int | None, world_size: int | None) -> "RunSetup":
        device = resolve_device(tc.device)
        precision = resolve_precision(tc.precision, device)
        rank, world_size = distributed.resolve_world(rank, world_size)
        micro, accum = split_global_batch(tc.batch_size, tc.micro_batch_size, world_size)
        return cls(device, precision, rank, world_size, BatchShard(rank, world_size), micro, accum,
                   seed_everything(tc.seed, device))

    def sampler(self, num_items: int, seed: int) -> EpochBatchSampler:
        """This rank's share of every global micro-batch, epoch after epoch."""
        return EpochBatchSampler(num_items, self.micro * self.world_size, seed=seed, rank=self.rank,
                                 world_size=self.world_size)

    def checkpoints(self, tc: TrainerConfig, checkpoint_dir: str | None,
                    storage_options: dict[str, Any] | None) -> CheckpointManager | None:
        if not checkpoint_dir:
            return None
        return CheckpointManager(checkpoint_dir, keep=tc.keep_checkpoints, storage_options=storage_options)


class MetricWindow:
    """Averages step metrics over a logging interval without a host sync per step (values stay tensors)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0
        self.history: dict[str, list[tuple[int, float]]] = {}

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        for k, v in logs.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += 1

    def flush(self, step: int, **extra: float) -> dict[str, float]:
        """Means since the last flush (over all processes when distributed: every rank must call it at this step)."""
        keys = sorted(self.sums)
        if keys and distributed.is_distributed():
            dev = self.sums[keys[0]].device
            stacked = distributed.all_reduce_mean(torch.stack([self.sums[k].float().reshape(()).to(dev) for k in keys]))
            self.sums = dict(zip(keys, stacked.unbind()))
        means = {k: float(v) / max(self.n, 1) for k, v in self.sums.items()}  # one sync per interval
        means.update(extra)
        for k, v in means.items():
            self.history.setdefault(k, []).append((step, v))
        self.sums, self.n = {}, 0
        return means


def make_adam(params: list[torch.Tensor], device: torch.device, adamw: bool = False, **kwargs: Any) -> torch.optim.Optimizer:
    """Adam/AdamW with the fused kernel (CPU and CUDA: one kernel for all parameters, ~4x faster than foreach on
    CPU at 37 M parameters, and it can skip a non-finite step on the device), foreach where fused is unsupported."""
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    if device.type in ("cpu", "cuda"):
        return cls(params, **kwargs, fused=True)
    return cls(params, **kwargs, foreach=True)


# ---------------------------------------------------------------------------------------------------------------
# Throughput and MFU
# ---------------------------------------------------------------------------------------------------------------

_PEAKS: dict[tuple[str, str], float | None] = {}


class ThroughputMeter:
    """Samples/s, model FLOPs per sample and MFU, for the tracker.

    ``flops``: a function returning the FLOPs per sample of each kind of pass (e.g. the autoencoder's generator
    step before and after the discriminator starts, and the discriminator step), counted on meta tensors
    (`ldm_core.flops`), called once, at the first report; counting on the real step would perturb its numerics
    (and so exact resume). The peak is the device's: the measured matmul rate on CPU (once per process), the
    datasheet on known GPUs. MFU = FLOPs/sample × samples/s per device ÷ peak.
    """

    def __init__(self, device: torch.device, precision: str, world_size: int = 1,
                 flops: Callable[[], dict[str, float]] | None = None):
        self.device, self.precision, self.world_size = device, precision, world_size
        self._flops_fn, self._flops = flops, None
        self.t0 = time.perf_counter()
        self.samples = 0

    def add(self, samples: int) -> None:
        self.samples += samples

    def rate(self) -> float:
        """Global samples per second since the meter was created."""
        return self.samples / max(time.perf_counter() - self.t0, 1e-9)

    def peak(self) -> float | None:
        key = (self.device.type, self.precision)
        if key not in _PEAKS:
            from ldm_core.flops import peak_flops

            _PEAKS[key] = peak_flops(self.device, self.precision)
        return _PEAKS[key]

    def flops(self) -> dict[str, float]:
        if self._flops is None:
            try:
                self._flops = self._flops_fn() if self._flops_fn is not None else {}
            except Exception as e:  # a model the counter cannot trace must not stop training
                log.warning("could not count model FLOPs (%s); MFU will not be reported", e)
                self._flops = {}
        return self._flops

    def metrics(self, kinds: Sequence[str], name: str = "samples_per_second") -> dict[str, float]:
        rate = self.rate()
        out = {name: rate}
        flops = sum(self.flops().get(k, 0.0) for k in kinds)
        if flops:
            achieved = flops * rate / self.world_size  # per device
            out["model_tflops_per_device"] = achieved / 1e12
            peak = self.peak()
            if peak:
                out["mfu"] = achieved / peak
        return out
