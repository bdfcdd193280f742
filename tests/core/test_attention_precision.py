"""The attention's precision rule: fp32 for CPU bf16 training at narrow heads (where that kernel is faster), the
plain call everywhere else; and the models route their attention through it."""

import pytest
import torch
import torch.nn.functional as F

from ldm_core.models.attention import CPU_FP32_MAX_HEAD_DIM, attention, use_fp32
from ldm_core.models.unet import UNET_PRESETS, UNet


def _qkv(d: int, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 64, d, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def test_narrow_heads_in_a_bf16_autocast_are_computed_in_fp32_and_still_differentiate():
    q, k, v = _qkv(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v)
        assert use_fp32(q)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    low = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    # fp32 inside, rounded once at the end: exactly the fp32 result rounded; the bf16 kernel differs from it
    assert torch.equal(out, exact.to(torch.bfloat16))
    assert not torch.equal(low, out)
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))


@pytest.mark.parametrize("case", ["wide heads", "no grad", "fp32"])
def test_everything_else_is_the_plain_call(case):
    d = CPU_FP32_MAX_HEAD_DIM * 2 if case == "wide heads" else 8
    q, k, v = _qkv(d, torch.float32 if case == "fp32" else torch.bfloat16)
    with torch.set_grad_enabled(case != "no grad"):
        assert not use_fp32(q)
        assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_the_unet_attends_through_the_rule(monkeypatch):
    calls = []
    import ldm_core.models.attention as module

    monkeypatch.setattr(module, "use_fp32", lambda q: calls.append(q.shape[-1]) or False)
    cfg = UNET_PRESETS["tiny"]
    UNet(cfg)(torch.randn(2, 4, 8, 8), torch.ones(2), torch.randn(2, 16, cfg.context_dim))
    assert calls and set(calls) == {2 * cfg.model_channels // cfg.num_heads}
