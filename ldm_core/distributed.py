"""Data parallelism across processes: the process group that ``torchrun`` describes, and the split of a global batch.

``torchrun --nproc-per-node N …`` starts N copies of a script with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in their environment. ``init_distributed()`` turns that into a process group (NCCL on GPUs, gloo on
CPUs) and pins each process to its GPU; without those variables (a plain ``python`` run, a test, an in-process
Dagster asset) every function here is a no-op and the trainers run exactly as a single process.

The trainers keep N processes step-for-step equal to one process with the same global batch:
- each rank gets rows ``rank, rank + N, …`` of every global batch (`EpochBatchSampler`, `BatchShard`);
- every random draw of a step (noise, timesteps, caption dropout, posterior samples) is made for the whole global
  batch from a generator seeded identically on every rank, and each rank keeps its rows (`BatchShard`), so a
  sample's randomness depends on its place in the global batch, not on how the batch is split;
- gradients are averaged by DistributedDataParallel (the mean of per-rank means of equal-sized slices is the
  global mean), and the few quantities that are not linear in the batch (the adaptive GAN weight's gradient norms,
  ActNorm's data-dependent init, BatchNorm statistics) are computed on the global batch.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 1800.0  # a collective that waits longer than this means a rank died: fail rather than hang


# ---------------------------------------------------------------------------------------------------------------
# The process group
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among world_size processes, its GPU index on the node, the backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    """"nccl", "gloo", or None when not distributed."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process launch (torchrun or any env:// launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def default_backend() -> str:
    """NCCL where there are GPUs, gloo on CPUs."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistributedContext:
    """Join the process group torchrun describes (idempotent); a no-op returning rank 0 of 1 when not launched so.

    backend: "auto" (NCCL with GPUs, else gloo), "nccl" or "gloo". With NCCL, this process is pinned to GPU
    LOCAL_RANK first, so "cuda" means its own GPU from here on.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched_by_torchrun():
        return DistributedContext()
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE > 1 but {missing} are not set: launch with torchrun (or set all of {TORCHRUN_ENV})"
        )
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; cannot train with WORLD_SIZE > 1")
    backend = default_backend() if backend == "auto" else backend
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' needs CUDA GPUs; use 'gloo' on CPUs")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    ctx = current()
    log.info(
        "joined process group: rank %d of %d (local rank %d, %s)", ctx.rank, ctx.world_size, ctx.local_rank, backend
    )
    return ctx


def current() -> DistributedContext:
    """This process's place in the initialized process group (rank 0 of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext()
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=dist.get_backend(),
    )


def is_distributed() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True on rank 0 (and in every non-distributed process): the one that tracks, checkpoints and registers."""
    return current().rank == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def teardown() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(backend: str = "auto") -> Iterator[DistributedContext]:
    """``init_distributed()`` for the duration of a block, then ``teardown()``."""
    ctx = init_distributed(backend)
    try:
        yield ctx
    finally:
        teardown()


def resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The (rank, world_size) a trainer runs as: the process group's, checked against explicit values if given."""
    ctx = current()
    if rank is None and world_size is None:
        return ctx.rank, ctx.world_size
    rank = ctx.rank if rank is None else rank
    world_size = ctx.world_size if world_size is None else world_size
    if (rank, world_size) != (ctx.rank, ctx.world_size):
        if world_size > 1 and not is_distributed():
            raise ValueError(
                f"world_size={world_size} needs an initialized process group: launch with torchrun and "
                "call ldm_core.distributed.init_distributed() first"
            )
        raise ValueError(
            f"rank={rank}, world_size={world_size} disagree with the process group "
            f"(rank {ctx.rank} of {ctx.world_size})"
        )
    return rank, world_size


# ---------------------------------------------------------------------------------------------------------------
# Collectives the trainers use (each a no-op / identity in a single process)
# ---------------------------------------------------------------------------------------------------------------


def _all_reduced(t: torch.Tensor, op: Any) -> torch.Tensor:
    """A detached copy of ``t`` reduced with ``op`` over ranks (the input is untouched)."""
    out = t.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over ranks (a new tensor; ``t`` is untouched)."""
    if not is_distributed():
        return t
    return _all_reduced(t, dist.ReduceOp.SUM) / dist.get_world_size()  # SUM then divide: gloo has no AVG


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """The maximum of ``t`` over ranks (a new tensor; the input is untouched); asynchronous on the device."""
    if not is_distributed():
        return t
    return _all_reduced(t, dist.ReduceOp.MAX)


def all_ranks_agree(flag: bool | torch.Tensor, device: torch.device | str | None = None) -> bool:
    """True only when ``flag`` is true on every rank (a logical AND over ranks)."""
    if not is_distributed():
        return bool(flag)
    t = flag.float().reshape(()) if isinstance(flag, torch.Tensor) else torch.tensor(float(flag), device=device)
    return bool(_all_reduced(t, dist.ReduceOp.MIN).item() > 0.5)


def any_rank(flag: bool, device: torch.device | str | None = None) -> bool:
    """True when ``flag`` is true on at least one rank (a logical OR over ranks)."""
    return not all_ranks_agree(not flag, device)


def gather_global_batch(x: torch.Tensor) -> torch.Tensor:
    """The global batch from every rank's rows ``rank::world``: (b, …) per rank -> (b·world, …) in global order."""
    if not is_distributed():
        return x
    world = dist.get_world_size()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    # rank r holds global rows r, r + world, …: stacking on dim 1 and flattening interleaves them back
    return torch.stack(parts, dim=1).reshape(x.shape[0] * world, *x.shape[1:])


def wrap_ddp(module: nn.Module, device: torch.device, sync_buffers: bool = True) -> nn.Module:
    """``module`` in DistributedDataParallel when distributed (GPU: pinned to this process's device), else as is.

    sync_buffers=False: skip DDP's copy of rank 0's buffers before every forward (for buffers that are kept equal
    on every rank by construction, such as SyncBatchNorm statistics).
    """
    if not is_distributed():
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    kwargs: dict[str, Any] = {}
    if not sync_buffers:  # torch versions name the option differently: use the name this one has
        name = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers"
        )
        kwargs[name] = False
    device_ids = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    )
    return DistributedDataParallel(module, device_ids=device_ids, **kwargs)


def no_sync_unless(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) in this forward/backward unless ``sync``
    (accumulation: sync the last only)."""
    if hasattr(module, "set_requires_gradient_sync"):
        from ldm_core.fsdp import gradient_sync

        return gradient_sync(module, sync)
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers as SyncBatchNorm when distributed, so their statistics are the global batch's.

    SyncBatchNorm runs on GPUs only: on CPUs a multi-process run with BatchNorm fails here with what to use instead.
    """
    if not is_distributed() or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return module
    if device.type != "cuda":
        raise ValueError(
            "BatchNorm under multi-process training needs SyncBatchNorm, which runs on GPUs only; on CPUs "
            "use a batch-size-independent norm (e.g. discriminator.norm: actnorm or group)"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


# ---------------------------------------------------------------------------------------------------------------
# The split of a global batch, and randomness drawn for the whole of it
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchShard:
    """This process's rows of a global batch: rows ``rank, rank + world_size, …`` (the split `EpochBatchSampler` makes).

    Random draws are made for the whole global batch, from a generator seeded identically on every rank, and each
    rank keeps its rows, so a sample's noise does not depend on how many processes share the batch. With one
    process (the default) a draw is exactly the plain draw of the local batch.
    """

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global-batch tensor: (b·world, …) -> (b, …)."""
        return x if self.world_size == 1 else x[self.rank :: self.world_size]

    def global_shape(self, local_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        return (local_shape[0] * self.world_size, *local_shape[1:])

    def randn(
        self, local_shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """N(0, 1) of ``local_shape``: this rank's rows of one draw for the global batch (kwargs: device, dtype)."""
        return self.take(torch.randn(self.global_shape(local_shape), generator=generator, **kwargs))

    def rand(self, n_local: int, generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
        """U[0, 1) of shape (n_local,): this rank's entries of one draw for the global batch."""
        return self.take(torch.rand(n_local * self.world_size, generator=generator, **kwargs))


SINGLE = BatchShard()


__all__ = [
    "BatchShard",
    "DistributedContext",
    "SINGLE",
    "all_ranks_agree",
    "all_reduce_max",
    "all_reduce_mean",
    "any_rank",
    "barrier",
    "convert_batchnorm",
    "current",
    "default_backend",
    "distributed_session",
    "gather_global_batch",
    "init_distributed",
    "is_distributed",
    "is_main",
    "launched_by_torchrun",
    "no_sync_unless",
    "resolve_world",
    "teardown",
    "wrap_ddp",
]
