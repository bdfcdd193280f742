"""Noise schedules against their closed forms: β tables, ᾱ, the forward marginal, and flow time sampling."""

import math

import pytest
import torch

from ldm_core.diffusion.objectives import q_sample
from ldm_core.diffusion.schedules import (
    alphas_cumprod,
    betas_cosine,
    betas_linear,
    betas_scaled_linear,
    make_betas,
    sample_t_logit_normal,
    sample_t_uniform,
    shift_t,
)


def test_cosine_alphas_cumprod_match_closed_form_where_unclipped():
    T, s, max_beta = 1000, 0.008, 0.999
    betas = betas_cosine(T, s, max_beta)
    ab = alphas_cumprod(betas)
    # Index i holds ᾱ after i+1 steps: f(i+1)/f(0) with f(t) = cos²(((t/T + s)/(1 + s))·π/2).
    t = torch.arange(1, T + 1, dtype=torch.float64)
    f = lambda u: torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    closed = f(t) / f(torch.zeros((), dtype=torch.float64))
    unclipped = torch.cumprod(betas < max_beta, 0).bool()  # once a β is clipped, every later ᾱ departs
    assert unclipped.sum() >= T - 2, "the clip should only touch the very last steps"
    torch.testing.assert_close(ab[unclipped], closed[unclipped], rtol=1e-12, atol=0)
    assert betas.dtype == torch.float64 and betas.max() <= max_beta and betas.min() > 0


def test_scaled_linear_is_linear_in_sqrt_beta():
    T, b0, b1 = 1000, 0.00085, 0.012
    betas = betas_scaled_linear(T, b0, b1)
    torch.testing.assert_close(betas, torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float64) ** 2)
    root = betas.sqrt()
    steps = root.diff()
    torch.testing.assert_close(steps, torch.full_like(steps, (b1**0.5 - b0**0.5) / (T - 1)), rtol=1e-9, atol=0)
    assert math.isclose(betas[0].item(), b0, rel_tol=1e-12) and math.isclose(betas[-1].item(), b1, rel_tol=1e-12)


def test_linear_betas_and_alphas_cumprod_product():
    T = 1000
    betas = betas_linear(T)
    assert betas.dtype == torch.float64
    assert math.isclose(betas[0].item(), 1e-4) and math.isclose(betas[-1].item(), 0.02)
    torch.testing.assert_close(betas.diff(), torch.full((T - 1,), (0.02 - 1e-4) / (T - 1), dtype=torch.float64))
    ab = alphas_cumprod(betas)
    # ᾱ_t = Π(1 − β): compare the log-sum form at a few indices
    for i in (0, 10, 500, T - 1):
        assert math.isclose(ab[i].item(), math.exp(sum(math.log1p(-b) for b in betas[: i + 1].tolist())), rel_tol=1e-12)
    assert ab[-1] < 1e-4, "Ho et al.'s schedule ends (almost) at pure noise"


def test_make_betas_defaults_and_overrides():
    torch.testing.assert_close(make_betas("scaled_linear", 1000), betas_scaled_linear(1000))
    torch.testing.assert_close(make_betas("linear", 10, beta_end=0.5), betas_linear(10, 1e-4, 0.5))
    torch.testing.assert_close(make_betas("cosine", 50), betas_cosine(50))
    with pytest.raises(ValueError, match="cosine"):
        make_betas("cosine", 50, beta_start=0.1)


def test_forward_marginal_moments_by_monte_carlo():
    """q(x_t | x0) = N(√ᾱ·x0, (1−ᾱ)·I), Eq. 4 of Ho et al. 2020."""
    g = torch.Generator().manual_seed(0)
    ab_table = alphas_cumprod(betas_scaled_linear(1000))
    x0 = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    n = 100_000
    for t in (0, 250, 999):
        ab = ab_table[t].item()
        eps = torch.randn(n, 3, generator=g, dtype=torch.float64)
        x_t = q_sample(x0.expand(n, 3), eps, torch.full((n,), ab, dtype=torch.float64))
        sd = math.sqrt(1 - ab)
        mc = 5 * sd / math.sqrt(n)  # 5 standard errors of the sample mean
        torch.testing.assert_close(x_t.mean(0), math.sqrt(ab) * x0, atol=mc, rtol=0)
        torch.testing.assert_close(
            x_t.var(0), torch.full((3,), 1 - ab, dtype=torch.float64), rtol=5 * math.sqrt(2 / n), atol=0
        )


def test_shift_fixed_points_midpoint_and_inverse():
    for shift in (0.5, 1.0, 3.0):
        assert shift_t(0.0, shift) == 0.0 and shift_t(1.0, shift) == 1.0
        assert math.isclose(shift_t(0.5, shift), shift / (1 + shift))
        t = torch.linspace(0, 1, 101, dtype=torch.float64)
        # the shift by 1/s undoes the shift by s, and the map is monotone
        torch.testing.assert_close(shift_t(shift_t(t, shift), 1 / shift), t)
        assert torch.all(shift_t(t, shift).diff() > 0)
    t = torch.rand(10, dtype=torch.float64)
    torch.testing.assert_close(shift_t(t, 1.0), t)
    assert torch.all(shift_t(t, 3.0) >= t), "shift > 1 moves times toward noise"


def test_logit_normal_samples_have_the_given_logit_moments():
    n, mean, std = 200_000, -0.5, 1.5
    t = sample_t_logit_normal(n, mean, std, generator=torch.Generator().manual_seed(1))
    assert t.shape == (n,) and torch.all((t > 0) & (t < 1))
    logit = torch.logit(t.double())
    assert abs(logit.mean().item() - mean) < 5 * std / math.sqrt(n)
    assert abs(logit.std().item() / std - 1) < 5 / math.sqrt(2 * n)


def test_uniform_samples_and_generator_determinism():
    n = 200_000
    t = sample_t_uniform(n, generator=torch.Generator().manual_seed(2))
    assert torch.all((t >= 0) & (t < 1))
    assert abs(t.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(t.var().item() - 1 / 12) < 0.002
    a = sample_t_logit_normal(8, generator=torch.Generator().manual_seed(3))
    b = sample_t_logit_normal(8, generator=torch.Generator().manual_seed(3))
    c = sample_t_logit_normal(8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
