"""Our MMDiT <-> diffusers' SD3Transformer2DModel: identical outputs for identical weights, both directions."""

from __future__ import annotations

import math

import pytest
import torch

# diffusers is an optional dependency of ldm_core (interop imports it lazily): without it, skip this module
from diffusers import SD3Transformer2DModel

from ldm_core.interop import from_diffusers, to_diffusers
from ldm_core.interop.mmdit import config_from_diffusers
from ldm_core.models.mmdit import MMDIT_PRESETS, MMDiT, MMDiTConfig, sincos_pos_embed_2d

get_2d_sincos_pos_embed = pytest.importorskip("diffusers.models.embeddings").get_2d_sincos_pos_embed

TOL = 1e-4

# Two shapes, written in diffusers' own terms (not derived from our mapping), with their expected MMDiTConfig and a
# non-square latent size.
#  p2: SD3 style, 2x2 patches, no QK norm, 3 blocks, 2 heads of 8, a pooled vector narrower than the tokens,
#      6 x 10 latents (3 x 5 patches cropped from a 6 x 6 grid)
#  p1-rms: SD3.5 style QK RMSNorm, 1x1 patches, 2 blocks, 3 heads of 8, pooled width = token width, more output
#      channels than input channels, 5 x 7 latents cropped from a 9 x 9 grid (odd margins)
CASES = {
    "p2": (
        {
            "sample_size": 8,
            "patch_size": 2,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 3,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "joint_attention_dim": 12,
            "caption_projection_dim": 16,
            "pooled_projection_dim": 10,
            "pos_embed_max_size": 6,
            "qk_norm": None,
        },
        MMDiTConfig(
            in_channels=4,
            out_channels=4,
            patch_size=2,
            hidden_size=16,
            depth=3,
            num_heads=2,
            context_dim=12,
            pooled_projection_dim=10,
            sample_size=8,
            pos_embed_max_size=6,
        ),
        (6, 10),
    ),
    "p1-rms": (
        {
            "sample_size": 6,
            "patch_size": 1,
            "in_channels": 4,
            "out_channels": 6,
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 3,
            "joint_attention_dim": 12,
            "caption_projection_dim": 24,
            "pooled_projection_dim": 12,
            "pos_embed_max_size": 9,
            "qk_norm": "rms_norm",
        },
        MMDiTConfig(
            in_channels=4,
            out_channels=6,
            patch_size=1,
            hidden_size=24,
            depth=2,
            num_heads=3,
            context_dim=12,
            pooled_projection_dim=None,
            sample_size=6,
            pos_embed_max_size=9,
            qk_norm="rms_norm",
        ),
        (5, 7),
    ),
}


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Draw every parameter and the positional grid afresh with a seeded generator: the zero-initialised
    modulations and output layer (and the unit RMSNorm gains) would hide mistakes from the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*model.parameters(), *model.buffers()]:
            std = 1 / math.sqrt(p[0].numel()) if p.ndim > 1 and p.shape[0] > 1 else 0.5  # weights by fan-in
            p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def inputs(case: str, seed: int = 1):
    _, cfg, (h, w) = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, cfg.in_channels, h, w, generator=g)
    t = torch.tensor([3.0, 401.5, 999.0])
    context = torch.randn(3, 5, cfg.context_dim, generator=g)
    pooled = torch.randn(3, cfg.pooled_dim, generator=g)
    return x, t, context, pooled


def max_diff(ours: MMDiT, theirs: SD3Transformer2DModel, case: str) -> float:
    """Max |ours - diffusers| over a batch of 3 with different times; diffusers has no text mask, so ours gets
    an all-True one (and none), and both get the same pooled vector."""
    x, t, context, pooled = inputs(case)
    full = torch.ones(3, context.shape[1], dtype=torch.bool)
    with torch.no_grad():
        b = theirs(x, context, pooled, t).sample
        diffs = []
        for mask in (None, full):
            a = ours(x, t, context, mask, pooled)
            assert a.shape == b.shape == (3, ours.config.out_channels, *x.shape[-2:])
            assert a.abs().mean() > 0.1  # a comparison of non-trivial outputs
            diffs.append((a - b).abs().max().item())
    return max(diffs)


# ---------------------------------------------------------------------------------------------------------------
# Parity, both directions
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_diffusers_to_ours_same_outputs(case):
    theirs = randomized(SD3Transformer2DModel(**CASES[case][0]))
    ours = from_diffusers(theirs)
    assert isinstance(ours, MMDiT)
    assert ours.config == CASES[case][1]
    assert max_diff(ours, theirs, case) < TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_ours_to_diffusers_same_outputs(case):
    ours = randomized(MMDiT(CASES[case][1]))
    theirs = to_diffusers(ours)
    assert isinstance(theirs, SD3Transformer2DModel)
    for key, value in CASES[case][0].items():  # the diffusers config is the one written above
        assert theirs.config[key] == value, key
    assert max_diff(ours, theirs, case) < TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_round_trips_are_exact(case):
    ours = randomized(MMDiT(CASES[case][1]))
    theirs = to_diffusers(ours)
    back = from_diffusers(theirs)
    assert back.config == ours.config
    again = to_diffusers(back)
    for a, b in ((ours.state_dict(), back.state_dict()), (theirs.state_dict(), again.state_dict())):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_positional_grid_is_diffusers_and_travels_with_the_weights():
    for dim, grid, base in [(16, 6, 4), (24, 9, 6), (64, 30, 10)]:
        ref = get_2d_sincos_pos_embed(dim, grid, base_size=base).float()
        assert torch.equal(sincos_pos_embed_2d(dim, grid, base), ref)
    # a checkpoint's grid (here: perturbed) is carried over as is, not recomputed
    theirs = SD3Transformer2DModel(**CASES["p2"][0])
    with torch.no_grad():
        theirs.pos_embed.pos_embed.add_(0.01)
    assert torch.equal(from_diffusers(theirs).x_embedder.pos_embed, theirs.pos_embed.pos_embed)


def test_sd3_medium_is_our_preset_with_the_same_parameter_count():
    # SD3-medium's published transformer config, in diffusers' terms
    with torch.device("meta"):
        sd3 = SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
        )
        ours = MMDiT(MMDIT_PRESETS["sd3-medium"])
    assert config_from_diffusers(sd3.config) == MMDIT_PRESETS["sd3-medium"]
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in sd3.parameters()) == 2_028_328_000


# ---------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("dual_attention_layers", (0, 1)),
        ("qk_norm", "layer_norm"),
        ("qk_norm", "rms_norm_across_heads"),
        ("caption_projection_dim", 32),
        ("pos_embed_max_size", None),
    ],
)
def test_unrepresentable_configs_are_refused_with_the_field_named(field, value):
    config = dict(SD3Transformer2DModel(**CASES["p2"][0]).config)
    config[field] = value
    with pytest.raises(ValueError, match=field):
        config_from_diffusers(config)


def test_refusal_through_the_public_entry_point():
    theirs = SD3Transformer2DModel(**{**CASES["p2"][0], "dual_attention_layers": (0,)})
    with pytest.raises(ValueError, match="dual_attention_layers"):
        from_diffusers(theirs)
