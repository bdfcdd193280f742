"""Starting a trainer from given weights (a warm start) instead of its seeded random initialisation."""

from __future__ import annotations

import torch
from torch import nn


def load_init_weights(model: nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Load starting weights strictly into ``model`` (the ``what`` the run config describes): a missing or unexpected
    key, or a shape that differs, is a ValueError naming it, since the config and the weights then describe
    different networks."""
    own = model.state_dict()
    for k, v in weights.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(
                f"init weights: {k} has shape {tuple(v.shape)}, the configured {what}'s is {tuple(own[k].shape)}"
            )
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ValueError(f"init weights do not fit the configured {what}: {' '.join(str(e).split())[:400]}") from None
