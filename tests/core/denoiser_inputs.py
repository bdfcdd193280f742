"""Inputs and a learning check shared by the tests of every denoiser backbone (they all take the same call)."""

from __future__ import annotations

import torch
from torch import nn


def inputs(batch: int = 2, tokens: int = 5, dim: int = 12, side: int = 8, seed: int = 1):
    """(x (B, 4, side, side), t (B,) on 0..1000, context (B, tokens, dim)), deterministic from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, side, side, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    context = torch.randn(batch, tokens, dim, generator=g)
    return x, t, context


def overfit_ratio(model: nn.Module, steps: int, dim: int = 384) -> float:
    """Final / first loss of Adam (lr 3e-3) fitting one fixed batch of random targets for ``steps`` steps."""
    x, t, context = inputs(batch=4, tokens=4, dim=dim)
    target = torch.randn_like(x)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = (model(x, t, context) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[-1] / losses[0]


def assert_loads_identically(model: nn.Module, old_state: dict[str, torch.Tensor]) -> None:
    """A fresh model of ``model``'s config, loaded (strictly) from ``old_state``, has ``model``'s weights and
    outputs, bit for bit."""
    loaded = type(model)(model.config).eval()
    loaded.load_state_dict(old_state, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x, t, context = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, context), model(x, t, context))
