"""Classifier-free guidance (Ho & Salimans 2022): caption dropout in training, the guided prediction at sampling.

The denoiser interface is ``model(x, t, context, context_mask, pooled=None) -> prediction`` with x (B, C, H, W),
t (B,) float model time, context (B, L, D) text embeddings, context_mask (B, L) bool (True = a real token) or None,
and pooled (B, D_pool) the caption's pooled vector (the MMDiT's modulation; the UNet ignores it). The null caption
has a pooled vector too, and the unconditional branch always gets the null caption's tokens and vector together.
Guidance is a linear combination of two predictions at the same (x_t, t); every prediction type here (ε, v, x0,
flow velocity) is an affine function of ε at fixed (x_t, t) with the same coefficients for both branches, so
guiding the raw network output equals guiding ε — the combination can be applied before any conversion.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm_core.distributed import SINGLE, BatchShard

Denoiser = Callable[..., torch.Tensor]
"""``model(x, t, context, context_mask[, pooled=…])``: the pooled keyword is passed only when there is one."""


def _batch(ctx: torch.Tensor, B: int) -> torch.Tensor:
    """A (1, L, D) or (B, L, D) tensor as (B, L, D): one prompt embedding (e.g. the empty one) serves the batch."""
    if ctx.shape[0] == B:
        return ctx
    if ctx.shape[0] != 1:
        raise ValueError(f"context batch {ctx.shape[0]} matches neither the batch {B} nor 1")
    return ctx.expand(B, *ctx.shape[1:])


def _masks(
    cond_ctx: torch.Tensor, cond_mask: torch.Tensor | None, uncond_ctx: torch.Tensor, uncond_mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both masks or neither: where only one side has a mask, the other attends to all its tokens."""
    if cond_ctx.shape[1:] != uncond_ctx.shape[1:]:
        raise ValueError(
            f"conditional context {tuple(cond_ctx.shape[1:])} and unconditional context "
            f"{tuple(uncond_ctx.shape[1:])} differ in (L, D): encode both with the same padding"
        )
    if cond_mask is None and uncond_mask is None:
        return None, None
    if cond_mask is None:
        cond_mask = torch.ones(cond_ctx.shape[:2], dtype=torch.bool, device=cond_ctx.device)
    if uncond_mask is None:
        uncond_mask = torch.ones(uncond_ctx.shape[:2], dtype=torch.bool, device=uncond_ctx.device)
    return cond_mask.bool(), uncond_mask.bool()


def _pooled_pair(pooled: torch.Tensor | None, uncond_pooled: torch.Tensor | None) -> bool:
    """Whether there are pooled vectors: both or neither (a null caption's vector cannot be made up)."""
    if (pooled is None) != (uncond_pooled is None):
        raise ValueError(
            "pooled and uncond_pooled go together: pass the null caption's pooled vector with the "
            "captions' (or neither)"
        )
    return pooled is not None


def cfg_model(
    model: Denoiser,
    context: torch.Tensor,
    context_mask: torch.Tensor | None,
    uncond_context: torch.Tensor,
    uncond_mask: torch.Tensor | None,
    scale: float,
    *,
    pooled: torch.Tensor | None = None,
    uncond_pooled: torch.Tensor | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A plain ``(x, t) -> prediction`` callable applying classifier-free guidance,
    pred = pred_uncond + s·(pred_cond − pred_uncond) (Eq. 6 of Ho & Salimans 2022 with s = 1 + w).

    Both branches run in one forward pass of batch 2B (uncond first). At s = 1 the result is exactly the
    conditional prediction: only that branch is evaluated. ``context`` and ``uncond_context`` may have batch 1, and
    so may ``pooled`` (B or 1, D_pool) and ``uncond_pooled`` (1 or B, D_pool), which come together or not at all.
    """
    has_pooled = _pooled_pair(pooled, uncond_pooled)

    if scale == 1:

        def conditional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            B = x.shape[0]
            mask = None if context_mask is None else _batch(context_mask, B)
            if has_pooled:
                return model(x, t, _batch(context, B), mask, pooled=_batch(pooled, B))
            return model(x, t, _batch(context, B), mask)

        return conditional

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        t = t.expand(B) if t.ndim == 0 else t
        cond = _batch(context, B)
        uncond = _batch(uncond_context, B).to(device=context.device, dtype=context.dtype)
        cmask, umask = _masks(cond, context_mask, uncond, uncond_mask)
        mask = None if cmask is None else torch.cat([_batch(umask, B), _batch(cmask, B)])  # (2B, L)
        args = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]), mask)
        if has_pooled:
            upooled = _batch(uncond_pooled, B).to(device=pooled.device, dtype=pooled.dtype)
            out = model(*args, pooled=torch.cat([upooled, _batch(pooled, B)]))  # (2B, C, H, W)
        else:
            out = model(*args)  # (2B, C, H, W)
        pred_uncond, pred_cond = out.chunk(2)
        return pred_uncond + scale * (pred_cond - pred_uncond)

    return guided


def drop_conditioning(
    context: torch.Tensor,
    mask: torch.Tensor | None,
    uncond_context: torch.Tensor,
    uncond_mask: torch.Tensor | None,
    p: float,
    generator: torch.Generator | None = None,
    shard: BatchShard = SINGLE,
    *,
    pooled: torch.Tensor | None = None,
    uncond_pooled: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Caption dropout for classifier-free guidance training (Algorithm 1 of Ho & Salimans 2022): each sample's caption
    is replaced by the empty prompt with probability ``p``, independently: its token embeddings, its mask and its
    pooled vector together, so a dropped caption leaves no trace in either conditioning path of the MMDiT.

    context (B, L, D), mask (B, L) or None; uncond_context (1 or B, L, D), uncond_mask (1 or B, L) or None;
    pooled (B, D_pool) and uncond_pooled (1 or B, D_pool), both or neither.
    Returns (context, mask, pooled); the mask is None only when both inputs are None, pooled only when it was
    not given. One uniform draw per sample is always taken from ``generator``, whatever p and whether there is a
    pooled vector, so the random stream depends on neither. ``shard``: when the batch is one process's rows of a
    global batch, the draws are made for the global batch and sliced.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    has_pooled = _pooled_pair(pooled, uncond_pooled)
    B = context.shape[0]
    gen_device = generator.device if generator is not None else "cpu"
    drop = (shard.rand(B, generator=generator, device=gen_device) < p).to(context.device)  # (B,) bool
    uncond = _batch(uncond_context, B).to(device=context.device, dtype=context.dtype)
    cmask, umask = _masks(context, mask, uncond, uncond_mask)
    out = torch.where(drop[:, None, None], uncond, context)
    out_pooled = None
    if has_pooled:
        upooled = _batch(uncond_pooled, B).to(device=pooled.device, dtype=pooled.dtype)
        out_pooled = torch.where(drop[:, None].to(pooled.device), upooled, pooled)  # (B, D_pool)
    if cmask is None:
        return out, None, out_pooled
    return out, torch.where(drop[:, None], _batch(umask, B).to(cmask.device), cmask), out_pooled


__all__ = ["Denoiser", "cfg_model", "drop_conditioning"]
