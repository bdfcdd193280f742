"""eps / v / x0 conversions, Min-SNR weights and the rectified-flow path, against their closed forms."""

import itertools

import pytest
import torch

from ldm_core.diffusion.objectives import (
    convert_prediction,
    ddpm_target,
    eps_from_velocity,
    flow_interpolate,
    flow_velocity_target,
    min_snr_weight,
    q_sample,
    snr,
    x0_from_velocity,
)


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.9999, 0.99, 0.7, 0.3, 0.01, 1e-4], dtype=torch.float64)
    return x0, eps, ab


def test_targets_follow_their_definitions(pair):
    x0, eps, ab = pair
    a, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(q_sample(x0, eps, ab), a * x0 + s * eps)
    torch.testing.assert_close(ddpm_target("v", x0, eps, ab), a * eps - s * x0)  # Salimans & Ho 2022
    assert ddpm_target("eps", x0, eps, ab) is eps and ddpm_target("x0", x0, eps, ab) is x0


def test_conversions_recover_every_target_and_are_mutual_inverses(pair):
    x0, eps, ab = pair
    x_t = q_sample(x0, eps, ab)
    truth = {k: ddpm_target(k, x0, eps, ab) for k in ("eps", "v", "x0")}
    for src, dst in itertools.product(truth, truth):
        converted = convert_prediction(truth[src], src, dst, x_t, ab)
        torch.testing.assert_close(converted, truth[dst], rtol=1e-9, atol=1e-9)
        # the round trip is the identity for any prediction, not only the consistent one
        arbitrary = torch.randn_like(x_t)
        back = convert_prediction(convert_prediction(arbitrary, src, dst, x_t, ab), dst, src, x_t, ab)
        torch.testing.assert_close(back, arbitrary, rtol=1e-9, atol=1e-9)


def test_scalar_alpha_bar_broadcasts(pair):
    x0, eps, _ = pair
    torch.testing.assert_close(q_sample(x0, eps, 0.3), q_sample(x0, eps, torch.full((6,), 0.3, dtype=torch.float64)))


def test_min_snr_weights_closed_form():
    ab = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.001], dtype=torch.float64)
    gamma = 5.0
    r = ab / (1 - ab)
    torch.testing.assert_close(snr(ab), r)
    m = torch.minimum(r, torch.full_like(r, gamma))
    torch.testing.assert_close(min_snr_weight(r, gamma, "eps"), m / r)
    torch.testing.assert_close(min_snr_weight(r, gamma, "v"), m / (r + 1))
    torch.testing.assert_close(min_snr_weight(r, gamma, "x0"), m)
    # low-SNR steps keep full eps weight, including SNR = 0 (pure noise) where m/r is 0/0
    assert min_snr_weight(torch.zeros(1, dtype=torch.float64), gamma, "eps").item() == 1.0


def test_min_snr_weights_equalize_to_min_snr_times_x0_error(pair):
    """The defining property (Hang et al. 2023): each weighted loss equals min(SNR, γ)·‖x̂0 − x0‖²."""
    x0, eps, ab = pair
    gamma = 5.0
    x_t = q_sample(x0, eps, ab)
    wrong_x0 = x0 + 0.1 * torch.randn_like(x0)
    x0_err = (wrong_x0 - x0).pow(2).flatten(1).sum(1)
    reference = snr(ab).clamp(max=gamma) * x0_err
    for kind in ("eps", "v", "x0"):
        pred = convert_prediction(wrong_x0, "x0", kind, x_t, ab)
        err = (pred - ddpm_target(kind, x0, eps, ab)).pow(2).flatten(1).sum(1)
        torch.testing.assert_close(min_snr_weight(snr(ab), gamma, kind) * err, reference, rtol=1e-7, atol=1e-12)


def test_rectified_flow_path_and_velocity(pair):
    x0, eps, _ = pair
    t = torch.tensor([0.0, 0.1, 0.5, 0.7, 0.99, 1.0], dtype=torch.float64)
    torch.testing.assert_close(flow_interpolate(x0, eps, torch.zeros(6, dtype=torch.float64)), x0)
    torch.testing.assert_close(flow_interpolate(x0, eps, torch.ones(6, dtype=torch.float64)), eps)
    x_t = flow_interpolate(x0, eps, t)
    v = flow_velocity_target(x0, eps)
    torch.testing.assert_close(v, eps - x0)
    # the target is the time derivative of the path (central difference, exact for a straight line)
    h = 1e-3
    dx = (flow_interpolate(x0, eps, t + h) - flow_interpolate(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(dx, v, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x0_from_velocity(x_t, v, t), x0)
    torch.testing.assert_close(eps_from_velocity(x_t, v, t), eps)
