"""Sharded data parallelism: FSDP2 (`torch.distributed.fsdp.fully_shard`) for denoisers larger than one GPU's memory.

Under DDP every rank holds the whole model, its gradients and AdamW's two moments: 16 bytes per parameter in fp32,
32 GB for a 2 B-parameter MMDiT before the EMA and the activations. ``shard_model`` shards each block of the
denoiser (the UNet's residual and transformer blocks, the MMDiT's joint blocks) and then the root over the
ranks: a rank keeps 1/N of every parameter, gradient and optimizer moment, all-gathers a block's parameters just
before its forward (and again for its backward), and reduce-scatters its gradients right after, so at most a block
or two is ever whole. The optimizer and the gradient clipping see the sharded parameters (DTensors) and do the
same arithmetic as on whole tensors; `ShardedEMA` keeps the EMA in the same shards.

Mixed precision (`mixed_precision`): under bf16 the gathered parameters and the compute are bf16 and the gradients
are reduced in fp32 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`); the sharded master weights and
AdamW's moments stay fp32. fp16 is refused: its loss scale would need the sharded gradient scaler.

Activation checkpointing composes with it: the denoisers' ``gradient_checkpointing`` recomputes each block in the
backward pass (non-reentrant `torch.utils.checkpoint`), which gathers that block's parameters once more.

N FSDP processes take the steps of one process with the same global batch, as under DDP: each rank computes the
gradient of its rows (`ldm_core.distributed.BatchShard`), and the reduce-scatter averages over ranks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

FSDP_AUTO_PARAMETERS = 1_000_000_000
"""strategy "auto" shards a denoiser with at least this many parameters (the sd3-medium preset has 2.03 B)."""


def resolve_strategy(strategy: str, parameters: int) -> str:
    """ "ddp" or "fsdp" for a model of ``parameters`` parameters ("auto": fsdp from `FSDP_AUTO_PARAMETERS` up)."""
    if strategy == "auto":
        return "fsdp" if parameters >= FSDP_AUTO_PARAMETERS else "ddp"
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f'strategy must be "auto", "ddp" or "fsdp", got {strategy!r}')
    return strategy


def sharded_blocks(model: nn.Module) -> list[nn.Module]:
    """The units ``shard_model`` shards before the root: the MMDiT's joint blocks; the UNet's residual blocks and
    spatial transformers of every resolution level, and its middle block. Each is gathered whole for its forward and
    backward, so a unit bounds the unsharded memory. (Not the UNet's levels themselves: a level appends to and pops
    from the list of skips it is handed, and FSDP hands a module's forward copies of its arguments.)"""
    if hasattr(model, "joint_blocks"):
        return list(model.joint_blocks)
    if hasattr(model, "down") and hasattr(model, "up") and hasattr(model, "mid"):
        levels = [*model.down, *model.up]
        return [b for level in levels for b in (*level.res_blocks, *level.transformers)] + [model.mid]
    raise TypeError(f"no FSDP units known for {type(model).__name__}: shard the UNet or the MMDiT")


def mixed_precision(precision: str) -> Any:
    """The FSDP2 policy for a trainer precision: bf16 parameters and compute with fp32 gradient reduction, or none."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "fp16":
        raise ValueError(
            "strategy fsdp does not train in fp16 (its loss scale would need a sharded gradient scaler): "
            'use precision "bf16" (or "fp32")'
        )
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """``model`` with each of its `sharded_blocks` and then the root sharded over the process group (in place).

    Every rank must hold the same initial weights (the trainers seed alike on every rank). Needs an initialized
    process group; the model already on its device.
    """
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(precision)
    for block in sharded_blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def build_sharded(
    build: Callable[[], nn.Module],
    device: torch.device,
    precision: str,
    rank: int,
    prepare: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """A model sharded over the process group without any rank holding it whole on its device, and only rank 0
    holding it whole in host memory: rank 0 builds it on CPU (the seeded initialization, then ``prepare``, e.g. a
    warm start's weights); every rank builds it on the meta device, shards it (`shard_model`), allocates its shards
    on ``device``, and receives them from rank 0's whole copy (`set_model_state_dict` with broadcast_from_rank0).

    The weights are exactly the ones one process would build, and so is the global RNG after it: rank 0's state
    (advanced by its initialization) is given to every rank.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    whole = None
    if rank == 0:
        whole = build()
        if prepare is not None:
            prepare(whole)
    with torch.device("meta"):
        model = build()
    rng = [torch.get_rng_state()]
    dist.broadcast_object_list(rng, src=0)
    torch.set_rng_state(rng[0])
    shard_model(model, precision)
    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, whole.state_dict() if whole is not None else {}, options=options)
    del whole
    return model.train()


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Reduce-scatter the gradients of this backward pass only when ``sync`` (accumulation: the last micro-batch)."""
    if sync or not is_sharded(module):
        yield
        return
    module.set_requires_gradient_sync(False)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)  # type: ignore[attr-defined]


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor, gathered from every rank (a collective); the tensor itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class ShardedEMA:
    """Exponential moving average of a sharded model, kept in its shards: θ_ema ← d·θ_ema + (1−d)·θ per local shard.

    The same interface as `ldm_core.trainers.step.EMA` except for the whole module: ``state_dict`` gives DTensors
    under the model's parameter names (what a sharded checkpoint saves and reshards), and ``gather`` builds the whole
    EMA model on rank 0. On one process it is never used: the plain EMA's state dict has the same keys.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    @torch.no_grad()
    def update(self, model: nn.Module, skip: torch.Tensor | None = None) -> None:
        """``skip``: a 0-d 0/1 tensor; 1 leaves the average unchanged (a skipped step), without a host sync."""
        names = list(self.params)
        sources = dict(model.named_parameters())
        ema_p = [local(self.params[n]) for n in names]
        src_p = [local(sources[n].detach()) for n in names]
        weight = 1.0 - self.decay if skip is None else (1.0 - skip.to(ema_p[0].dtype)) * (1.0 - self.decay)
        torch._foreach_lerp_(ema_p, src_p, weight)
        for n, b in model.named_buffers():
            self.buffers[n].copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.params, **self.buffers}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing = sorted((set(self.params) | set(self.buffers)) - set(sd))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:5]}")
        with torch.no_grad():
            for n, t in {**self.params, **self.buffers}.items():
                local(t).copy_(local(sd[n]))


class OptimizerState:
    """An optimizer's state keyed by parameter names rather than positions (`torch.distributed.checkpoint.state_dict`),
    in this rank's shards: what a sharded checkpoint saves, so that it loads into any process count, sharded or not.
    Its state dict has the moments before the first step too (zeros), so a fresh run's can be loaded into."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        fresh = not self.optimizer.state
        sd = get_optimizer_state_dict(self.model, self.optimizer)
        if fresh:
            # torch makes the moments with a zero-lr step, which counts as a step in Adam's bias correction: a
            # fresh optimizer stays fresh (the returned zeros are what a checkpoint is loaded into)
            self.optimizer.state.clear()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, sd)


def gather_module(
    state: dict[str, torch.Tensor], build: Callable[[], nn.Module], rank: int, main: int = 0
) -> nn.Module | None:
    """The whole module from a (possibly sharded) state dict, built on CPU on rank ``main`` only: every rank takes
    part in gathering each tensor in turn (one whole tensor at a time on the device), only ``main`` keeps them.
    Other ranks get None."""
    whole: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        gathered = full(t.detach())
        if rank == main:
            whole[name] = gathered.cpu()
    if rank != main:
        return None
    module = build()
    module.load_state_dict(whole)
    return module


__all__ = [
    "FSDP_AUTO_PARAMETERS",
    "OptimizerState",
    "ShardedEMA",
    "build_sharded",
    "full",
    "gather_module",
    "gradient_sync",
    "is_sharded",
    "local",
    "mixed_precision",
    "resolve_strategy",
    "shard_model",
    "sharded_blocks",
]
