"""The text-token mask every denoiser takes: (B, L) bool, True = a real token, False = padding."""

from __future__ import annotations

from torch import Tensor


def has_padding(mask: Tensor) -> bool:
    """Whether a (B, L) token mask marks any padding. A mask without padding changes nothing, and attention without
    one runs the fastest kernels, so the denoisers drop it. On the meta device (FLOP counting) the values are
    unknown, so the answer is yes: the count then covers the masked path."""
    return mask.is_meta or not bool(mask.all())


__all__ = ["has_padding"]
