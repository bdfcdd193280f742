"""The fused attention projections: separate ones stacked exactly, and split back exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm_core.models.fused_projections import fuse_on_load, unfuse


class _Projections(nn.Module):
    def __init__(self, fused: str, out: int, bias: bool):
        super().__init__()
        setattr(self, fused, nn.Linear(4, out, bias=bias))
        self.to_out = nn.Linear(4, 4)
        self.register_load_state_dict_pre_hook(fuse_on_load)


@pytest.mark.parametrize(
    "fused, parts, bias", [("qkv", ("to_q", "to_k", "to_v"), True), ("to_kv", ("to_k", "to_v"), False)]
)
def test_split_then_load_is_the_identity_and_rows_stack_in_order(fused, parts, bias):
    m = _Projections(fused, 4 * len(parts), bias)
    state = {f"block.{k}": v for k, v in m.state_dict().items()}
    separate = unfuse(state)
    kinds = ("weight", "bias") if bias else ("weight",)
    assert set(separate) == {f"block.{p}.{k}" for p in parts for k in kinds} | {
        "block.to_out.weight",
        "block.to_out.bias",
    }
    for i, name in enumerate(parts):  # row blocks in the listed order
        assert torch.equal(separate[f"block.{name}.weight"], getattr(m, fused).weight[4 * i : 4 * (i + 1)])
    fresh = _Projections(fused, 4 * len(parts), bias)
    fresh.load_state_dict({k.removeprefix("block."): v.clone() for k, v in separate.items()}, strict=True)
    for key, value in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
