"""The PatchGAN discriminator: taming's layout, its init, small inputs, and the batch-independent norms."""

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from ldm_core.models.discriminator import ActNorm, DiscriminatorConfig, NLayerDiscriminator


def convs(d: NLayerDiscriminator) -> list[nn.Conv2d]:
    return [m for m in d.main if isinstance(m, nn.Conv2d)]


def test_layout_matches_taming_n_layers_3():
    d = NLayerDiscriminator(DiscriminatorConfig())
    layout = [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.bias is not None) for c in convs(d)]
    assert layout == [
        (3, 64, (4, 4), (2, 2), (1, 1), True),  # first conv: no norm follows, so it keeps its bias
        (64, 128, (4, 4), (2, 2), (1, 1), False),
        (128, 256, (4, 4), (2, 2), (1, 1), False),
        (256, 512, (4, 4), (1, 1), (1, 1), False),
        (512, 1, (4, 4), (1, 1), (1, 1), True),
    ]
    kinds = [type(m).__name__ for m in d.main]
    assert kinds == [
        "Conv2d",
        "LeakyReLU",
        "Conv2d",
        "BatchNorm2d",
        "LeakyReLU",
        "Conv2d",
        "BatchNorm2d",
        "LeakyReLU",
        "Conv2d",
        "BatchNorm2d",
        "LeakyReLU",
        "Conv2d",
    ]
    assert all(m.negative_slope == 0.2 for m in d.main if isinstance(m, nn.LeakyReLU))
    # conv weights 16·c_in·c_out, biases on the first and last conv, BatchNorm gain+bias 2·c
    expected = 16 * (3 * 64 + 64 * 128 + 128 * 256 + 256 * 512 + 512 * 1) + 64 + 1 + 2 * (128 + 256 + 512)
    assert sum(p.numel() for p in d.parameters()) == expected == 2_765_633


def test_channel_multiplier_caps_at_8():
    d = NLayerDiscriminator(DiscriminatorConfig(ndf=4, n_layers=5, norm="group", group_norm_groups=2))
    assert [c.out_channels for c in convs(d)] == [4, 8, 16, 32, 32, 32, 1]
    # with a non-BatchNorm norm every conv has a bias
    assert all(c.bias is not None for c in convs(d))


@pytest.mark.parametrize("size,grid", [(32, 2), (64, 6), (256, 30)])
def test_output_grid_size(size, grid):
    d = NLayerDiscriminator(DiscriminatorConfig(ndf=8, norm="group", group_norm_groups=4))
    assert d.output_size(size) == grid
    if size <= 64:
        out = d(torch.randn(2, 3, size, size))
        assert out.shape == (2, 1, grid, grid)


def test_small_images_32px_give_a_2x2_grid_and_too_small_ones_a_clear_error():
    d = NLayerDiscriminator(DiscriminatorConfig(ndf=8))
    out = d(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 1, 2, 2)
    assert torch.isfinite(out).all()
    assert d.min_input_size() == 24  # 24 -> 12 -> 6 -> 3 -> 2 -> 1
    assert d.output_size(24) == 1 and d.output_size(23) < 1
    with pytest.raises(ValueError, match="at least 24"):
        d(torch.randn(1, 3, 16, 16))


def test_init_dcgan_statistics():
    torch.manual_seed(0)
    d = NLayerDiscriminator(DiscriminatorConfig())
    w = torch.cat([c.weight.flatten() for c in convs(d)])
    assert abs(w.mean().item()) < 1e-3
    assert w.std().item() == pytest.approx(0.02, rel=0.01)
    bn = [m for m in d.main if isinstance(m, nn.BatchNorm2d)]
    gains = torch.cat([m.weight for m in bn]).detach()
    assert gains.mean().item() == pytest.approx(1.0, abs=0.005)
    assert gains.std().item() == pytest.approx(0.02, rel=0.15)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bn)


def test_group_norm_groups_are_clamped_to_divide_channels():
    d = NLayerDiscriminator(DiscriminatorConfig(ndf=6, norm="group", group_norm_groups=32))
    gns = [m for m in d.main if isinstance(m, nn.GroupNorm)]
    assert [(m.num_channels, m.num_groups) for m in gns] == [(12, 12), (24, 24), (48, 24)]
    with pytest.raises(ValidationError):
        DiscriminatorConfig(norm="instance")


@pytest.mark.parametrize("norm", ["group", "actnorm"])
def test_batch_size_independent_norms(norm):
    """With GroupNorm / (initialized) ActNorm an image's logits do not depend on the rest of its batch."""
    torch.manual_seed(0)
    d = NLayerDiscriminator(DiscriminatorConfig(ndf=8, norm=norm, group_norm_groups=4))
    x = torch.randn(4, 3, 32, 32)
    d.train()
    d(x)  # initializes ActNorm
    batch = d(x)
    single = torch.cat([d(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-5)


def test_actnorm_data_dependent_init():
    torch.manual_seed(0)
    layer = ActNorm(5)
    x = torch.randn(8, 5, 6, 6) * torch.arange(1.0, 6.0).view(1, 5, 1, 1) + 3.0
    layer.eval()
    layer(x)
    assert layer.initialized.item() == 0, "eval forwards must not initialize"
    layer.train()
    y = layer(x)
    assert layer.initialized.item() == 1
    flat = y.detach().transpose(0, 1).reshape(5, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1), torch.ones(5), atol=1e-5, rtol=0)
    # reference: loc = -mean, scale = 1/(std + 1e-6) per channel
    ref = x.transpose(0, 1).reshape(5, -1)
    torch.testing.assert_close(layer.loc.detach().flatten(), -ref.mean(1))
    torch.testing.assert_close(layer.scale.detach().flatten(), 1 / (ref.std(1) + 1e-6))
    # a second batch does not re-initialize
    loc = layer.loc.detach().clone()
    layer(torch.randn(8, 5, 6, 6))
    assert torch.equal(layer.loc.detach(), loc)


def test_actnorm_initialized_survives_state_dict_round_trip():
    torch.manual_seed(0)
    cfg = DiscriminatorConfig(ndf=8, norm="actnorm")
    a = NLayerDiscriminator(cfg).train()
    a(torch.randn(2, 3, 32, 32) * 5)
    state = a.state_dict()
    assert any(k.endswith("initialized") for k in state)

    b = NLayerDiscriminator(cfg).train()
    b.load_state_dict(state)
    b(torch.randn(2, 3, 32, 32))  # a resumed run's first batch: must not re-initialize
    for k, v in b.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)
