"""Behaviour of the MMDiT joint-attention denoiser (parity with diffusers: test_interop_mmdit.py)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm_core.flops import count_flops, denoiser_step_flops
from ldm_core.models.denoiser import BACKBONES, Denoiser, build_denoiser, parse_denoiser_config
from ldm_core.models.mmdit import (
    MMDIT_PRESETS,
    MMDiT,
    MMDiTConfig,
    masked_mean,
    sincos_pos_embed_2d,
)
from ldm_core.models.unet import UNET_PRESETS, UNet
from tests.core.denoiser_inputs import assert_loads_identically, inputs, overfit_ratio

# milliseconds per forward: 3 joint blocks of width 32, 2x2 patches, tokens of width 12 pooled by the model itself
SMALL = {
    "in_channels": 4,
    "out_channels": 4,
    "patch_size": 2,
    "hidden_size": 32,
    "depth": 3,
    "num_heads": 4,
    "context_dim": 12,
    "pooled_projection_dim": None,
    "sample_size": 8,
    "pos_embed_max_size": 8,
}

SD3_MEDIUM_PARAMETERS = 2_028_328_000  # counted on the meta device; diffusers' count agrees (test_interop_mmdit.py)
DIT_B_PARAMETERS = 251_171_344  # two streams per block: about twice DiT-B/2's 130 M


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Draw every parameter afresh: the zero-initialised modulations and output layer would hide the blocks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 1 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.5  # weights by fan-in; biases and gains 0.5
            p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def small(**change) -> MMDiT:
    return randomized(MMDiT(MMDiTConfig(**{**SMALL, **change}))).eval()


# ---------------------------------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------------------------------


def test_presets_validate_and_the_tiny_one_builds_and_runs():
    for name, cfg in MMDIT_PRESETS.items():
        assert MMDiTConfig.model_validate(cfg.to_dict()) == cfg, name
    tiny = MMDIT_PRESETS["tiny"]
    assert tiny.context_dim == 384 and tiny.pooled_projection_dim is None  # MiniLM tokens, pooled by the model
    model = MMDiT(tiny)
    for side in (8, 16):  # the demo's latents and the largest the positional grid covers
        x, t, context = inputs(batch=3, tokens=16, dim=384, side=side)
        assert model(x, t, context).shape == (3, 4, side, side)


def test_preset_parameter_counts_on_the_meta_device():
    with torch.device("meta"):
        sd3 = MMDiT(MMDIT_PRESETS["sd3-medium"])
        dit_b = MMDiT(MMDIT_PRESETS["dit-b"])
    assert sum(p.numel() for p in sd3.parameters()) == SD3_MEDIUM_PARAMETERS
    assert sum(p.numel() for p in dit_b.parameters()) == DIT_B_PARAMETERS
    cfg = MMDIT_PRESETS["sd3-medium"]
    assert (cfg.depth, cfg.num_heads, cfg.head_dim, cfg.hidden_size) == (24, 24, 64, 1536)
    assert MMDiTConfig() == cfg  # the defaults are SD3-medium's


def test_preset_with_overrides_and_an_unknown_preset():
    cfg = parse_denoiser_config({"kind": "mmdit", "preset": "tiny", "depth": 2})
    assert isinstance(cfg, MMDiTConfig) and cfg.depth == 2 and cfg.hidden_size == MMDIT_PRESETS["tiny"].hidden_size
    with pytest.raises(ValidationError, match=r"unknown MMDiT preset 'huge'.*dit-b.*sd3-medium.*tiny"):
        parse_denoiser_config({"kind": "mmdit", "preset": "huge"})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_heads": 3}, "not divisible by num_heads"),
        ({"hidden_size": 30, "num_heads": 3}, "multiple of 4"),
        ({"sample_size": 9}, "not divisible by patch_size"),
        ({"pos_embed_max_size": 3}, "does not cover"),
        ({"qk_norm": "layer_norm"}, "rms_norm"),
        ({"depth": 0}, "greater than or equal to 1"),
        ({"unknown_field": 1}, "Extra inputs are not permitted"),
    ],
)
def test_config_rejects_inconsistent_shapes(change, message):
    with pytest.raises(ValidationError, match=message):
        MMDiTConfig(**{**SMALL, **change})


# ---------------------------------------------------------------------------------------------------------------
# Patches and positions
# ---------------------------------------------------------------------------------------------------------------


def test_sincos_positions_closed_form():
    dim, grid, base = 16, 6, 3
    emb = sincos_pos_embed_2d(dim, grid, base)
    assert emb.shape == (grid * grid, dim)
    for i, j in [(0, 0), (1, 4), (5, 2)]:
        x, y = j * base / grid, i * base / grid  # column, row: the first half of the channels encodes x
        for k in range(dim // 4):
            w = 10_000 ** (-k / (dim // 4))
            row = emb[i * grid + j]
            assert row[k].item() == pytest.approx(math.sin(x * w), abs=1e-6)
            assert row[dim // 4 + k].item() == pytest.approx(math.cos(x * w), abs=1e-6)
            assert row[dim // 2 + k].item() == pytest.approx(math.sin(y * w), abs=1e-6)
            assert row[3 * dim // 4 + k].item() == pytest.approx(math.cos(y * w), abs=1e-6)


def test_inputs_use_the_centre_crop_of_the_positional_grid():
    embedder = MMDiT(MMDiTConfig(**SMALL)).x_embedder  # an 8 x 8 grid
    grid = embedder.pos_embed.view(8, 8, -1)
    torch.testing.assert_close(embedder.cropped_pos_embed(3, 6)[0], grid[2:5, 1:7].reshape(18, -1), rtol=0, atol=0)
    torch.testing.assert_close(embedder.cropped_pos_embed(8, 8)[0], embedder.pos_embed[0], rtol=0, atol=0)
    # the positions matter: the same patch content at another place gives another prediction
    model = small()
    x = torch.randn(1, 4, 4, 4).repeat(1, 1, 2, 2)  # 2 x 2 identical patch blocks
    out = model(x, 10.0, torch.randn(1, 3, 12))
    assert (out[..., :4, :4] - out[..., 4:, 4:]).abs().max() > 1e-3


def test_latent_sides_must_fit_the_patches_and_the_grid():
    model = small()
    x, t, context = inputs()
    assert model(x[..., :6, :4], t, context).shape == (2, 4, 6, 4)  # non-square works
    with pytest.raises(ValueError, match="multiples of patch_size"):
        model(x[..., :7, :], t, context)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        model(torch.randn(1, 4, 18, 8), 1.0, context[:1])


def test_time_may_be_a_float_a_scalar_tensor_or_per_sample():
    model = small()
    x, _, context = inputs(batch=3)
    with torch.no_grad():
        per_sample = model(x, torch.full((3,), 250.0), context)
        assert torch.equal(model(x, 250.0, context), per_sample)
        assert torch.equal(model(x, torch.tensor(250.0), context), per_sample)
        assert not torch.allclose(model(x, 251.0, context), per_sample)  # and it does depend on t
    with pytest.raises(ValueError, match="shape"):
        model(x, torch.zeros(2), context)


# ---------------------------------------------------------------------------------------------------------------
# Text conditioning: tokens, mask, pooled vector
# ---------------------------------------------------------------------------------------------------------------

MASK = torch.tensor([[True, True, False, False, False, False], [True, True, True, True, True, False]])


def test_output_depends_on_the_text_and_padding_has_no_effect():
    model = small()
    x, t, context = inputs(tokens=6)
    with torch.no_grad():
        out = model(x, t, context, MASK)
        other = context.clone()
        other[:, 0] += 1.0
        assert (model(x, t, other, MASK) - out).abs().max() > 1e-3  # another prompt, another prediction
        # garbage (even inf / NaN) in the padding positions changes nothing
        padded = context.clone()
        padded[~MASK] = 100.0 * torch.randn(int((~MASK).sum()), 12)
        padded[0, -1] = float("nan")
        padded[1, -1] = float("inf")
        torch.testing.assert_close(model(x, t, padded, MASK), out, rtol=0, atol=1e-5)
        # ... and is the same as not having those tokens at all (per sample: the lengths differ)
        for b, n in enumerate(MASK.sum(1).tolist()):
            alone = model(x[b : b + 1], t[b : b + 1], context[b : b + 1, :n])
            torch.testing.assert_close(alone, out[b : b + 1], rtol=0, atol=1e-5)
        # an all-True mask is no mask; and this mask does matter
        full = torch.ones(2, 6, dtype=torch.bool)
        torch.testing.assert_close(model(x, t, context, full), model(x, t, context), rtol=0, atol=1e-5)
        assert (model(x, t, context) - out).abs().max() > 1e-3


def test_padding_stays_out_of_the_attention_even_with_an_explicit_pooled_vector():
    # with `pooled` given, only the attention could see the padding: this checks its mask apart from the pooling's
    model = small()
    x, t, context = inputs(tokens=6)
    pooled = torch.randn(2, 12)
    with torch.no_grad():
        out = model(x, t, context, MASK, pooled)
        for b, n in enumerate(MASK.sum(1).tolist()):
            alone = model(x[b : b + 1], t[b : b + 1], context[b : b + 1, :n], pooled=pooled[b : b + 1])
            torch.testing.assert_close(alone, out[b : b + 1], rtol=0, atol=1e-5)


def test_without_a_pooled_vector_the_model_pools_the_real_tokens():
    model = small()
    x, t, context = inputs(tokens=6)
    mean = torch.stack([context[b, : int(n)].mean(0) for b, n in enumerate(MASK.sum(1))])  # (B, D) by hand
    torch.testing.assert_close(masked_mean(context, MASK), mean)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, t, context, MASK), model(x, t, context, MASK, pooled=mean), rtol=0, atol=1e-6
        )
        # the pooled vector is an input of its own: another vector, another prediction
        assert (model(x, t, context, MASK, pooled=mean + 1.0) - model(x, t, context, MASK)).abs().max() > 1e-3


def test_a_sample_without_real_tokens_sees_only_the_image():
    model = small()
    x, t, context = inputs()
    mask = torch.tensor([[False] * 5, [True] * 5])
    with torch.no_grad():
        out = model(x, t, context, mask)
        assert torch.isfinite(out).all()
        # same as no text tokens at all, with the pooled vector a zero vector
        empty = model(x[:1], t[:1], context[:1, :0], pooled=torch.zeros(1, 12))
        torch.testing.assert_close(out[:1], empty, rtol=0, atol=1e-5)


def test_pooled_vector_of_another_width_is_required():
    model = MMDiT(MMDiTConfig(**{**SMALL, "pooled_projection_dim": 20}))
    x, t, context = inputs()
    assert model(x, t, context, pooled=torch.randn(2, 20)).shape == x.shape
    with pytest.raises(ValueError, match="pass `pooled`"):
        model(x, t, context)


# ---------------------------------------------------------------------------------------------------------------
# Training behaviour
# ---------------------------------------------------------------------------------------------------------------


def test_adaln_zero_starts_at_zero_and_every_parameter_is_in_the_graph():
    torch.manual_seed(0)
    model = MMDiT(MMDiTConfig(**{**SMALL, "qk_norm": "rms_norm"}))
    x, t, context = inputs()
    out = model(x, t, context, MASK[:, :5])
    assert torch.equal(out, torch.zeros_like(out))  # zero output layer
    (out - torch.randn_like(out)).pow(2).mean().backward()
    # every parameter gets a gradient tensor (DDP without find_unused_parameters needs it), even those of the last
    # block's text queries, whose outputs are discarded
    assert all(p.grad is not None for p in model.parameters())
    assert model.final_layer.linear.weight.grad.abs().sum() > 0  # zero weights, non-zero gradient: it will move


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    plain = small(qk_norm="rms_norm").train()
    ckpt = MMDiT(MMDiTConfig(**{**plain.config.to_dict(), "gradient_checkpointing": True}))
    ckpt.load_state_dict(plain.state_dict())
    x, t, context = inputs(tokens=6)
    outs, grads = [], []
    for model in (plain, ckpt):
        xx, cc = x.clone().requires_grad_(), context.clone().requires_grad_()
        out = model(xx, t, cc, MASK)
        out.pow(2).mean().backward()
        outs.append(out.detach())
        grads.append([xx.grad, cc.grad] + [p.grad for p in model.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_checkpoint_with_separate_q_k_v_projections_loads_into_the_fused_qkv():
    # SD3's layout, and our checkpoints' before the projections were fused: to_q, to_k, to_v per stream
    model = small(qk_norm="rms_norm")
    old = {}
    for key, value in model.state_dict().items():
        if ".qkv." in key:
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3)):
                old[key.replace(".qkv.", f".{name}.")] = part.clone()
        else:
            old[key] = value
    assert len(old) == len(model.state_dict()) + 2 * 2 * 2 * model.config.depth  # 2 streams x (weight, bias)
    assert_loads_identically(model, old)


def test_tiny_preset_overfits_one_batch():
    torch.manual_seed(0)
    assert overfit_ratio(build_denoiser(parse_denoiser_config({"kind": "mmdit", "preset": "tiny"})), steps=20) < 0.25


def test_step_flops_are_counted_on_meta_tensors_and_match_a_real_count():
    cfg = MMDIT_PRESETS["tiny"]
    meta = denoiser_step_flops(cfg, (4, 8, 8), (16, 384), batch=2)
    model = MMDiT(cfg)
    x, t, context = torch.randn(2, 4, 8, 8), torch.rand(2) * 1000, torch.randn(2, 16, 384)
    mask = torch.ones(2, 16, dtype=torch.bool)
    # The meta device runs attention as the math kernel (two counted bmm's and their backward); the CPU would pick
    # its flash kernel, which FlopCounterMode does not count at all. The same kernel here gives the same count.
    with sdpa_kernel(SDPBackend.MATH):
        real = count_flops(lambda: model(x, t, context, mask).float().pow(2).mean().backward()) / 2
    assert real > 0 and meta == real


# ---------------------------------------------------------------------------------------------------------------
# Denoiser interface
# ---------------------------------------------------------------------------------------------------------------


def test_build_denoiser_from_saved_config():
    model = build_denoiser(parse_denoiser_config({"kind": "mmdit", "preset": "tiny"}))
    assert isinstance(model, MMDiT) and isinstance(model, Denoiser)
    assert model.config == MMDIT_PRESETS["tiny"]
    # what a checkpoint stores is plain data; the kind tag picks the class back
    again = parse_denoiser_config(model.config.to_dict())
    assert again == model.config and type(again) is MMDiTConfig


@pytest.mark.parametrize("config_cls", list(BACKBONES), ids=lambda c: c.__name__)
def test_every_registered_backbone_is_picked_by_its_kind_tag(config_cls):
    kind = config_cls.model_fields["kind"].default
    config = parse_denoiser_config({"kind": kind, "preset": "tiny"})
    assert type(config) is config_cls
    with torch.device("meta"):
        assert type(build_denoiser(config)) is BACKBONES[config_cls]


def test_an_unregistered_backbone_kind_is_refused():
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        parse_denoiser_config({"kind": "dit"})


def test_every_backbone_takes_the_same_call():
    x, t, context = inputs(tokens=16, dim=384)
    mask = torch.ones(2, 16, dtype=torch.bool)
    pooled = torch.randn(2, 384)
    unet = UNet(UNET_PRESETS["tiny"]).eval()
    mmdit = randomized(MMDiT(MMDIT_PRESETS["tiny"])).eval()
    with torch.no_grad():
        for model in (unet, mmdit):
            assert model(x, t, context, mask, pooled=pooled).shape == x.shape
        # the UNet reads the text only through its tokens: the pooled vector is accepted and ignored
        assert torch.equal(unet(x, t, context, mask, pooled=pooled), unet(x, t, context, mask))
