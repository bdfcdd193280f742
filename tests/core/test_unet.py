"""Behaviour of the text-conditioned UNet and the denoiser interface (parity with diffusers: test_interop_unet.py)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from ldm_core.models.denoiser import Denoiser, build_denoiser, parse_denoiser_config
from ldm_core.models.embeddings import timestep_embedding
from ldm_core.models.unet import UNET_PRESETS, SpatialTransformer, UNet, UNetConfig
from tests.core.denoiser_inputs import assert_loads_identically, inputs, overfit_ratio

# small enough to run in milliseconds; two levels, transformers at both and in the mid block
SMALL = dict(
    model_channels=16,
    channel_mult=[1, 2],
    num_res_blocks=1,
    attention_levels=[0, 1],
    num_heads=2,
    context_dim=12,
    norm_groups=4,
)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter: zero-initialised proj_out would otherwise hide the transformers entirely."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


# ---------------------------------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------------------------------


def test_presets_validate_and_build():
    for name, cfg in UNET_PRESETS.items():
        assert UNetConfig.model_validate(cfg.to_dict()) == cfg, name
    tiny = UNET_PRESETS["tiny"]
    assert tiny.context_dim == 384  # all-MiniLM-L6-v2's width
    model = UNet(tiny)
    x, t, context = inputs(batch=3, tokens=16, dim=384)
    assert model(x, t, context).shape == (3, 4, 8, 8)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_channels=30), "not divisible by norm_groups"),
        (dict(num_heads=3), "not divisible by num_heads"),
        (dict(attention_levels=[2]), "out of range"),
        (dict(attention_levels=[1, 1]), "duplicates"),
        (dict(num_head_channels=8), "at most one of num_heads"),  # SMALL sets num_heads
        (dict(model_channels=15, norm_groups=5), "even"),
        (dict(num_res_blocks=0), "greater than or equal to 1"),
        (dict(channel_mult=[]), "at least 1"),
        (dict(attention_levels="0"), "list"),
        (dict(unknown_field=1), "Extra inputs are not permitted"),
    ],
)
def test_config_rejects_inconsistent_shapes(change, message):
    with pytest.raises(ValidationError, match=message):
        UNetConfig(**{**SMALL, **change})


def test_num_head_channels_gives_more_heads_deeper():
    cfg = UNetConfig(**{**SMALL, "num_heads": None, "num_head_channels": 4})
    model = UNet(cfg)
    assert model.down[0].transformers[0].blocks[0].self_attn.heads == 4  # 16 channels / 4
    assert model.mid.transformer.blocks[0].cross_attn.heads == 8  # 32 channels / 4


# ---------------------------------------------------------------------------------------------------------------
# Timestep embedding
# ---------------------------------------------------------------------------------------------------------------


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (4, 8)
    for i, ti in enumerate(t.tolist()):
        for k in range(4):
            freq = 10_000 ** (-k / 4)
            assert emb[i, k].item() == pytest.approx(math.cos(ti * freq), abs=1e-5)
            assert emb[i, 4 + k].item() == pytest.approx(math.sin(ti * freq), abs=1e-5)


def test_time_may_be_a_float_a_scalar_tensor_or_per_sample():
    model = randomized(UNet(UNetConfig(**SMALL))).eval()
    x, _, context = inputs(batch=3)
    with torch.no_grad():
        per_sample = model(x, torch.full((3,), 250.0), context)
        assert torch.equal(model(x, 250.0, context), per_sample)
        assert torch.equal(model(x, torch.tensor(250.0), context), per_sample)
        assert torch.equal(model(x, torch.full((3,), 250, dtype=torch.long), context), per_sample)
        assert not torch.allclose(model(x, 251.0, context), per_sample)  # and it does depend on t
    with pytest.raises(ValueError, match="shape"):
        model(x, torch.zeros(2), context)


# ---------------------------------------------------------------------------------------------------------------
# Spatial transformer and text conditioning
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("linear", [False, True])
def test_zero_init_proj_out_makes_every_transformer_the_identity(linear):
    torch.manual_seed(0)
    model = UNet(UNetConfig(**{**SMALL, "use_linear_projection": linear, "transformer_depth": 2}))
    transformers = [m for m in model.modules() if isinstance(m, SpatialTransformer)]
    assert len(transformers) == 2 + 1 + 4  # down: 1 per level; mid: 1; up: num_res_blocks + 1 per level
    x, _, context = inputs()
    for st in transformers:
        h = torch.randn(2, st.norm.num_channels, 4, 4)
        assert torch.equal(st(h, context), h)
    # hence the whole UNet ignores the text at initialisation
    with torch.no_grad():
        a = model(x, 10.0, context)
        b = model(x, 10.0, torch.randn_like(context))
    assert torch.equal(a, b)


def test_transformer_count_matches_levels():
    model = UNet(UNetConfig(**{**SMALL, "num_res_blocks": 2, "channel_mult": [1, 2, 2], "attention_levels": [1]}))
    assert [len(level.transformers) for level in model.down] == [0, 2, 0]
    assert [len(level.transformers) for level in model.up] == [0, 3, 0]  # num_res_blocks + 1 on the way up
    assert [len(level.res_blocks) for level in model.up] == [3, 3, 3]


def test_output_depends_on_the_text_and_masked_tokens_have_no_effect():
    model = randomized(UNet(UNetConfig(**SMALL))).eval()
    x, t, context = inputs(tokens=6)
    mask = torch.tensor([[True, True, True, False, False, False], [True, True, True, True, True, False]])
    with torch.no_grad():
        out = model(x, t, context, mask)
        # another prompt embedding -> another prediction
        other = context.clone()
        other[:, 0] += 1.0
        assert (model(x, t, other, mask) - out).abs().max() > 1e-3
        # garbage in the padding positions changes nothing
        padded = context.clone()
        padded[~mask] = 100.0 * torch.randn(int((~mask).sum()), context.shape[-1])
        torch.testing.assert_close(model(x, t, padded, mask), out, rtol=0, atol=1e-5)
        # ... and is the same as not having those tokens at all (per sample, since lengths differ)
        for b, n in enumerate(mask.sum(1).tolist()):
            alone = model(x[b : b + 1], t[b : b + 1], context[b : b + 1, :n])
            torch.testing.assert_close(alone, out[b : b + 1], rtol=0, atol=1e-5)
        # an all-True mask is no mask
        torch.testing.assert_close(
            model(x, t, context, torch.ones(2, 6, dtype=torch.bool)), model(x, t, context), rtol=0, atol=1e-6
        )


def test_sample_without_real_tokens_attends_to_nothing():
    # A fully masked sample gets a zero cross-attention read-out: exactly what an all-zero context gives, since
    # to_k/to_v have no bias (zero values, whatever the weights). No NaN.
    model = randomized(UNet(UNetConfig(**SMALL))).eval()
    x, t, context = inputs()
    mask = torch.tensor([[False] * 5, [True] * 5])
    with torch.no_grad():
        out = model(x, t, context, mask)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[:1], model(x[:1], t[:1], torch.zeros_like(context[:1])), rtol=0, atol=1e-5)
        torch.testing.assert_close(out[1:], model(x[1:], t[1:], context[1:]), rtol=0, atol=1e-5)


def test_sides_not_divisible_by_the_downsampling_factor():
    model = randomized(UNet(UNetConfig(**{**SMALL, "channel_mult": [1, 2, 2]})))
    x, t, context = inputs(side=9)
    assert model(x, t, context).shape == (2, 4, 9, 9)


# ---------------------------------------------------------------------------------------------------------------
# Training behaviour
# ---------------------------------------------------------------------------------------------------------------


def test_every_parameter_gets_a_gradient_and_proj_out_learns_from_zero():
    model = UNet(UNetConfig(**SMALL))
    x, t, context = inputs()
    model(x, t, context).pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    for st in (m for m in model.modules() if isinstance(m, SpatialTransformer)):
        assert st.proj_out.weight.grad.abs().sum() > 0  # zero weights, non-zero gradient: it will move


def test_gradient_checkpointing_gives_the_same_gradients():
    # dropout > 0: the recomputation must replay the same dropout masks
    cfg = UNetConfig(**{**SMALL, "dropout": 0.2})
    plain = randomized(UNet(cfg))
    ckpt = UNet(UNetConfig(**{**cfg.to_dict(), "gradient_checkpointing": True}))
    ckpt.load_state_dict(plain.state_dict())
    x, t, context = inputs()
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(123)
        xx = x.clone().requires_grad_()
        model(xx, t, context, mask).pow(2).mean().backward()
        grads.append([xx.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_checkpoint_with_separate_q_k_v_projections_loads_into_the_fused_ones():
    # SD's layout, and our checkpoints' before the projections were fused: to_q, to_k, to_v per attention
    model = randomized(UNet(UNetConfig(**SMALL))).eval()
    old = {}
    for key, value in model.state_dict().items():
        if key.endswith(".qkv.weight"):
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3)):
                old[key.replace(".qkv.", f".{name}.")] = part.clone()
        elif key.endswith(".to_kv.weight"):
            for name, part in zip(("to_k", "to_v"), value.chunk(2)):
                old[key.replace(".to_kv.", f".{name}.")] = part.clone()
        else:
            old[key] = value
    transformers = sum(1 for k in model.state_dict() if k.endswith(".qkv.weight"))  # 2 down, mid, 4 up
    assert transformers == 7 and len(old) == len(model.state_dict()) + 3 * transformers  # +2 self, +1 cross
    assert_loads_identically(model, old)


def test_tiny_preset_overfits_one_batch():
    torch.manual_seed(0)
    assert overfit_ratio(build_denoiser(UNET_PRESETS["tiny"]), steps=30) < 0.5


# ---------------------------------------------------------------------------------------------------------------
# Denoiser interface
# ---------------------------------------------------------------------------------------------------------------


def test_build_denoiser_from_saved_config():
    cfg = UNetConfig(**SMALL)
    model = build_denoiser(cfg)
    assert isinstance(model, UNet) and isinstance(model, Denoiser)
    # what a checkpoint stores is plain data; the kind tag picks the class back
    again = parse_denoiser_config(cfg.to_dict())
    assert again == cfg and type(again) is UNetConfig
    with pytest.raises(ValidationError, match="kind"):
        parse_denoiser_config({**cfg.to_dict(), "kind": "dit"})
    with pytest.raises(TypeError):
        build_denoiser(object())


def test_heads_default_to_eight_and_kind_defaults_to_unet():
    from ldm_core.models.denoiser import parse_denoiser_config

    cfg = parse_denoiser_config({"model_channels": 64, "channel_mult": [1, 2], "attention_levels": [1]})
    assert isinstance(cfg, UNetConfig) and cfg.num_heads == 8 and cfg.num_head_channels is None
    assert UNetConfig(num_head_channels=64).num_heads is None
