"""Our UNet <-> diffusers' UNet2DConditionModel: identical outputs for identical weights, both directions."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402

from ldm_core.interop import from_diffusers, to_diffusers  # noqa: E402
from ldm_core.interop.unet import config_from_diffusers  # noqa: E402
from ldm_core.models.embeddings import timestep_embedding  # noqa: E402
from ldm_core.models.unet import UNET_PRESETS, UNet, UNetConfig  # noqa: E402

TOL = 1e-4

# Two shapes, written in diffusers' own terms (not derived from our mapping), with their expected UNetConfig.
#  A: 2 levels, cross-attention everywhere, 1x1-conv projections (SD-1 style), 4 heads at every level
#  B: 3 levels, attention only at the middle level, Linear projections (SD-2 style), 8 channels per head
#     (4 heads at level 1, 8 in the mid block), 2 transformer blocks deep, 2 residual blocks per level
CASES = {
    "A": (
        dict(
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=4,
            cross_attention_dim=12,
            attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            use_linear_projection=False,
        ),
        UNetConfig(
            model_channels=16,
            channel_mult=[1, 2],
            num_res_blocks=1,
            attention_levels=[0, 1],
            num_heads=4,
            context_dim=12,
            norm_groups=4,
            use_linear_projection=False,
        ),
    ),
    "B": (
        dict(
            block_out_channels=(16, 32, 64),
            layers_per_block=2,
            norm_num_groups=8,
            cross_attention_dim=12,
            attention_head_dim=(2, 4, 8),
            transformer_layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True,
        ),
        UNetConfig(
            model_channels=16,
            channel_mult=[1, 2, 4],
            num_res_blocks=2,
            attention_levels=[1],
            num_heads=None,
            num_head_channels=8,
            transformer_depth=2,
            context_dim=12,
            norm_groups=8,
            use_linear_projection=True,
        ),
    ),
}


def diffusers_unet(case: str) -> UNet2DConditionModel:
    kwargs, _ = CASES[case]
    return UNet2DConditionModel(in_channels=4, out_channels=4, **kwargs)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (zero-initialised proj_out would hide the transformers from the comparison)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def inputs(side: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, side, side, generator=g)
    t = torch.tensor([3.0, 401.5, 999.0])
    context = torch.randn(3, 6, 12, generator=g)
    mask = torch.tensor([[True] * 2 + [False] * 4, [True] * 6, [True] * 5 + [False]])
    return x, t, context, mask


def assert_same_outputs(ours: UNet, theirs: UNet2DConditionModel, side: int = 8) -> None:
    x, t, context, mask = inputs(side)
    with torch.no_grad():
        for m in (None, mask):
            a = ours(x, t, context, m)
            b = theirs(x, t, context, encoder_attention_mask=m).sample
            assert a.abs().mean() > 0.1  # a comparison of non-trivial outputs
            assert (a - b).abs().max().item() < TOL, f"mask={m is not None}"
        # the mask matters, so both sides really honoured it
        assert (ours(x, t, context, mask) - ours(x, t, context)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Parity, both directions
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_diffusers_to_ours_same_outputs(case):
    torch.manual_seed(0)
    theirs = randomized(diffusers_unet(case))
    ours = from_diffusers(theirs)
    assert isinstance(ours, UNet)
    assert ours.config == CASES[case][1]
    assert_same_outputs(ours, theirs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_ours_to_diffusers_same_outputs(case):
    torch.manual_seed(0)
    ours = randomized(UNet(CASES[case][1]))
    theirs = to_diffusers(ours)
    assert isinstance(theirs, UNet2DConditionModel)
    for key, value in CASES[case][0].items():  # the diffusers config is the one written above
        assert tuple(theirs.config[key]) == value if isinstance(value, tuple) else theirs.config[key] == value, key
    assert_same_outputs(ours, theirs)


def test_odd_sides_upsample_to_the_skip_size_like_diffusers():
    ours = randomized(UNet(CASES["B"][1]))
    theirs = to_diffusers(ours)
    assert_same_outputs(ours, theirs, side=9)


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_round_trip_is_exact(case):
    ours = randomized(UNet(CASES[case][1]))
    back = from_diffusers(to_diffusers(ours))
    assert back.config == ours.config
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_timestep_features_match_diffusers():
    t = torch.tensor([0.0, 0.5, 17.25, 999.0])
    ref = get_timestep_embedding(t, 32, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 32), ref, rtol=0, atol=1e-6)


def test_sd1_config_is_our_sd1_preset():
    # SD-1's published UNet config is diffusers' default apart from the CLIP width and the sample size
    with torch.device("meta"):
        sd1 = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
        ours = UNet(UNET_PRESETS["sd1"])
    assert config_from_diffusers(sd1.config) == UNET_PRESETS["sd1"]
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in sd1.parameters())
    assert 855e6 < count < 865e6  # the "860M" of the SD-1 model card


# ---------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text_time"),
        ("act_fn", "gelu"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("flip_sin_to_cos", False),
        ("freq_shift", 1),
        ("time_embedding_type", "fourier"),
        ("mid_block_type", None),
        ("only_cross_attention", True),
        ("encoder_hid_dim", 32),
        ("conv_in_kernel", 1),
        ("norm_eps", 1e-6),
        ("layers_per_block", (1, 2)),
        ("cross_attention_dim", (12, 24)),
        ("transformer_layers_per_block", (1, 2)),
        ("attention_head_dim", (2, 8)),
        ("down_block_types", ("SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D")),
        ("up_block_types", ("UpBlock2D", "CrossAttnUpBlock2D")),
        ("block_out_channels", (16, 24)),
    ],
)
def test_unrepresentable_configs_are_refused_with_the_field_named(field, value):
    config = dict(diffusers_unet("A").config)
    config[field] = value
    with pytest.raises(ValueError, match=field):
        config_from_diffusers(config)


def test_refusal_through_the_public_entry_point():
    kwargs, _ = CASES["A"]
    theirs = UNet2DConditionModel(in_channels=4, out_channels=4, class_embed_type="timestep", **kwargs)
    with pytest.raises(ValueError, match="class_embed_type"):
        from_diffusers(theirs)
