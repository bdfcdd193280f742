"""Fused attention projections: one Linear where checkpoints of the SD lineage (and diffusers) hold several.

A stream's query, key and value projections read the same input, so one Linear to their stacked outputs makes one
matmul instead of three (a cross-attention's key and value read the text: two in one). The weights are the separate
ones stacked by rows, so converting is exact both ways: ``fuse_on_load`` lets a module load a state dict with the
separate projections, and ``unfuse`` splits ours back (ldm_core.interop uses it for diffusers' names).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

FUSED: dict[str, tuple[str, ...]] = {
    "qkv": ("to_q", "to_k", "to_v"),  # self-attention, and each MMDiT stream
    "to_kv": ("to_k", "to_v"),  # cross-attention's projections of the text
}
"""Fused Linear name -> the separate projections it stacks, in row order."""


def fuse_on_load(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook (``module.register_load_state_dict_pre_hook(fuse_on_load)``): separate projections
    in ``state_dict`` are stacked into the module's fused Linear."""
    for fused, parts in FUSED.items():
        if not isinstance(getattr(module, fused, None), nn.Linear):
            continue
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{name}.{kind}" for name in parts]
            if all(k in state_dict for k in keys):
                state_dict[f"{prefix}{fused}.{kind}"] = torch.cat([state_dict.pop(k) for k in keys])


def unfuse(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict with every fused projection split into the separate ones (views, no copies)."""
    out: dict[str, Tensor] = {}
    pattern = re.compile(rf"(.+)\.({'|'.join(FUSED)})\.(weight|bias)")
    for key, value in state.items():
        if m := pattern.fullmatch(key):
            prefix, fused, kind = m.groups()
            parts = FUSED[fused]
            out.update({f"{prefix}.{name}.{kind}": part for name, part in zip(parts, value.chunk(len(parts)))})
        else:
            out[key] = value
    return out


__all__ = ["FUSED", "fuse_on_load", "unfuse"]
