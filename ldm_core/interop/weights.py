"""Moving weights between our modules and diffusers': what every conversion checks and keeps."""

from __future__ import annotations

import torch


def check_same_keys(ours: set[str], theirs: set[str], what: str) -> None:
    """Every parameter has a counterpart on the other side, or a ValueError names the first ones that do not."""
    missing, extra = sorted(ours - theirs), sorted(theirs - ours)
    if missing or extra:
        raise ValueError(
            f"{what}: parameters without a counterpart; ours only: {missing[:8]}, diffusers only: {extra[:8]}"
        )


def like(target: torch.nn.Module, source: torch.nn.Module) -> torch.nn.Module:
    """``target`` on the device and in the dtype and train/eval mode of ``source``."""
    p, q = next(source.parameters()), next(target.parameters())
    if (p.device, p.dtype) != (q.device, q.dtype):  # skip a no-op .to(): diffusers warns on any dtype cast
        target = target.to(device=p.device, dtype=p.dtype)
    return target.train(source.training)


__all__ = ["check_same_keys", "like"]
