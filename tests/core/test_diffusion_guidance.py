"""Classifier-free guidance: the guided prediction against a manual computation, and caption dropout (tokens, mask
and pooled vector together)."""

import math

import pytest
import torch

from ldm_core.diffusion.guidance import cfg_model, drop_conditioning

B, C, L, D = 3, 4, 5, 4


class ToyDenoiser:
    """A deterministic stand-in for the network with the denoiser interface; records each call's batch size.

    Its output depends on x, t, the context and the mask (masked mean pooling), so a wrong pairing of branch and
    context, or a dropped mask, changes the result.
    """

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, context, mask):
        self.batches.append(x.shape[0])
        if mask is None:
            pooled = context.mean(1)  # (B, D)
        else:
            w = mask.to(context.dtype)[..., None]  # (B, L, 1)
            pooled = (context * w).sum(1) / w.sum(1).clamp(min=1)
        return x * torch.tanh(pooled)[:, :, None, None] + 0.01 * t[:, None, None, None]  # (B, C, H, W)


class PooledToyDenoiser(ToyDenoiser):
    """The same, plus a term from a pooled vector (B, D) given by keyword, as the MMDiT's modulation takes it."""

    def __call__(self, x, t, context, mask, pooled=None):
        return super().__call__(x, t, context, mask) + pooled.sum(1)[:, None, None, None]


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, 2, 2, generator=g)
    t = torch.tensor([10.0, 500.0, 999.0])
    ctx = torch.randn(B, L, D, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    uctx = torch.randn(1, L, D, generator=g)
    umask = torch.tensor([[1, 1, 0, 0, 0]], dtype=torch.bool)
    return x, t, ctx, mask, uctx, umask


def test_scale_one_is_exactly_the_conditional_prediction(inputs):
    x, t, ctx, mask, uctx, umask = inputs
    net = ToyDenoiser()
    guided = cfg_model(net, ctx, mask, uctx, umask, 1.0)(x, t)
    assert torch.equal(guided, ToyDenoiser()(x, t, ctx, mask))
    assert net.batches == [B], "only the conditional branch may run at s = 1"


def test_scale_three_matches_the_formula_in_one_batched_forward(inputs):
    x, t, ctx, mask, uctx, umask = inputs
    net = ToyDenoiser()
    guided = cfg_model(net, ctx, mask, uctx, umask, 3.0)(x, t)
    assert net.batches == [2 * B], "cond and uncond must share one forward pass"
    ref = ToyDenoiser()
    cond = ref(x, t, ctx, mask)
    uncond = ref(x, t, uctx.expand(B, L, D), umask.expand(B, L))
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond))
    assert not torch.allclose(guided, cond), "the test would be vacuous if guidance changed nothing"


def test_guidance_with_a_missing_mask_and_a_full_batch_uncond(inputs):
    x, t, ctx, mask, uctx, _ = inputs
    uctx_b = uctx.expand(B, L, D).clone()
    guided = cfg_model(ToyDenoiser(), ctx, mask, uctx_b, None, 2.0)(x, t)
    ref = ToyDenoiser()
    cond, uncond = ref(x, t, ctx, mask), ref(x, t, uctx_b, torch.ones(B, L, dtype=torch.bool))
    torch.testing.assert_close(guided, uncond + 2.0 * (cond - uncond))
    # no masks anywhere: the network gets None
    guided = cfg_model(ToyDenoiser(), ctx, None, uctx, None, 2.0)(x, t)
    cond, uncond = ref(x, t, ctx, None), ref(x, t, uctx.expand(B, L, D), None)
    torch.testing.assert_close(guided, uncond + 2.0 * (cond - uncond))


def test_guidance_rejects_mismatched_token_shapes(inputs):
    x, t, ctx, mask, _, _ = inputs
    with pytest.raises(ValueError, match="padding"):
        cfg_model(ToyDenoiser(), ctx, mask, torch.zeros(1, L + 1, D), None, 2.0)(x, t)


def test_dropout_p0_keeps_and_p1_replaces_everything(inputs):
    _, _, ctx, mask, uctx, umask = inputs
    out, out_mask, _ = drop_conditioning(ctx, mask, uctx, umask, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, ctx) and torch.equal(out_mask, mask)
    out, out_mask, _ = drop_conditioning(ctx, mask, uctx, umask, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, uctx.expand(B, L, D)) and torch.equal(out_mask, umask.expand(B, L))
    out, out_mask, _ = drop_conditioning(ctx, None, uctx, None, 1.0, torch.Generator().manual_seed(0))
    assert out_mask is None and torch.equal(out, uctx.expand(B, L, D))
    with pytest.raises(ValueError):
        drop_conditioning(ctx, mask, uctx, umask, 1.5)


def test_dropout_rate_is_p_per_sample_and_seeded():
    n, p = 20_000, 0.3
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(n, 2, 3, generator=g)  # continuous: no caption equals the empty one by chance
    mask = torch.ones(n, 2, dtype=torch.bool)
    uctx, umask = torch.zeros(1, 2, 3), torch.tensor([[True, False]])
    out, out_mask, _ = drop_conditioning(ctx, mask, uctx, umask, p, torch.Generator().manual_seed(2))
    dropped = (out == 0).all(dim=(1, 2))  # (n,)
    kept = (out == ctx).all(dim=(1, 2))
    assert torch.all(dropped ^ kept), "every row is either the caption or the empty prompt, whole"
    assert torch.equal(out_mask, torch.where(dropped[:, None], umask, mask)), "the mask follows its row"
    rate = dropped.double().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n), rate
    again, _, _ = drop_conditioning(ctx, mask, uctx, umask, p, torch.Generator().manual_seed(2))
    assert torch.equal(again, out)


def test_dropout_replaces_the_pooled_vector_with_its_row():
    n, p = 2000, 0.3
    g = torch.Generator().manual_seed(1)
    ctx, pooled = torch.randn(n, 2, 3, generator=g), torch.randn(n, 5, generator=g)
    mask = torch.ones(n, 2, dtype=torch.bool)
    uctx, umask, upooled = torch.zeros(1, 2, 3), torch.tensor([[True, False]]), torch.full((1, 5), 7.0)
    out, _, out_pooled = drop_conditioning(
        ctx, mask, uctx, umask, p, torch.Generator().manual_seed(2), pooled=pooled, uncond_pooled=upooled
    )
    dropped = (out == 0).all(dim=(1, 2))  # (n,)
    assert 0 < dropped.sum() < n
    assert torch.equal(out_pooled, torch.where(dropped[:, None], upooled, pooled)), "pooled must follow its caption"
    # the same draws with or without pooled vectors: adding them to a run changes no other random number
    without, _, none = drop_conditioning(ctx, mask, uctx, umask, p, torch.Generator().manual_seed(2))
    assert torch.equal(without, out) and none is None
    with pytest.raises(ValueError, match="together"):
        drop_conditioning(ctx, mask, uctx, umask, p, pooled=pooled)


def test_guidance_passes_each_branch_its_own_pooled_vector(inputs):
    x, t, ctx, mask, uctx, umask = inputs
    g = torch.Generator().manual_seed(3)
    pooled, upooled = torch.randn(B, D, generator=g), torch.randn(1, D, generator=g)
    net = PooledToyDenoiser()
    guided = cfg_model(net, ctx, mask, uctx, umask, 3.0, pooled=pooled, uncond_pooled=upooled)(x, t)
    assert net.batches == [2 * B]
    ref = PooledToyDenoiser()
    cond = ref(x, t, ctx, mask, pooled=pooled)
    uncond = ref(x, t, uctx.expand(B, L, D), umask.expand(B, L), pooled=upooled.expand(B, D))
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond))
    at_one = cfg_model(PooledToyDenoiser(), ctx, mask, uctx, umask, 1.0, pooled=pooled, uncond_pooled=upooled)(x, t)
    torch.testing.assert_close(at_one, cond)
    with pytest.raises(ValueError, match="together"):
        cfg_model(net, ctx, mask, uctx, umask, 3.0, pooled=pooled)
