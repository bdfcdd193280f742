"""The pieces of an optimizer step both trainers use: Adam(W) with the fused kernel, the learning-rate schedule,
gradient clipping, fp16's loss scale, the guard that skips a non-finite step without a host sync, and the EMA of
the weights."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ldm_core import distributed
from ldm_core.fsdp import full

log = logging.getLogger(__name__)


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
            log.warning(
                "%d step(s) with a non-finite loss or gradient skipped%s (%d in all)",
                n - self._reported,
                f" up to step {step}" if step is not None else "",
                n,
            )
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
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm, error_if_nonfinite=False, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in grads], foreach=True)
    # over sharded gradients (FSDP) the norm is a DTensor of the whole gradient: the same plain value on every rank
    return full(norm)


def lr_at(
    step: int,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "constant",
    min_lr_ratio: float = 0.0,
) -> float:
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


def make_adam(
    params: list[torch.Tensor], device: torch.device, adamw: bool = False, **kwargs: Any
) -> torch.optim.Optimizer:
    """Adam/AdamW with the fused kernel on CPU and CUDA (one kernel for all parameters, faster than foreach, and it
    can skip a non-finite step on the device), foreach where fused is unsupported."""
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    if device.type in ("cpu", "cuda"):
        return cls(params, **kwargs, fused=True)
    return cls(params, **kwargs, foreach=True)
