"""Samplers driven by exact denoisers for Gaussian data: they must reproduce the data distribution.

See diffusion_gaussian_oracle.py for the closed forms. The data are N(μ, σ²) in two dimensions with very
different scales, so a sampler that gets either the mean or the spread wrong shows it.
"""

import math

import pytest
import torch
from diffusion_gaussian_oracle import assert_moments, eps_oracle, single_thread, velocity_oracle  # noqa: F401 (fixture)

from ldm_core.diffusion.samplers import (
    ddim_timesteps,
    flow_timesteps,
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_heun,
)
from ldm_core.diffusion.schedules import alphas_cumprod, betas_linear, shift_t

MU = torch.tensor([1.5, -0.5], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 2.0], dtype=torch.float64)
T = 1000
AB = alphas_cumprod(betas_linear(T))  # ᾱ_{T−1} ≈ 4e-5: starting from N(0, I) is (almost) exact


def eps_model(mu=MU, sigma=SIGMA):
    # Sampler time is the same for the whole batch: look ᾱ up once.
    return lambda x, t: eps_oracle(x, AB[int(t[0])].item(), mu, sigma)


def velocity_model(mu=MU, sigma=SIGMA):
    return lambda x, t: velocity_oracle(x, t[0].item(), mu, sigma)


def noise(n, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def affine_map(sample):
    """A deterministic sampler with a linear-Gaussian oracle is x ↦ A·x + b per dimension: read off (A, b)."""
    b = sample(torch.zeros(1, 2, dtype=torch.float64))[0]
    return sample(torch.ones(1, 2, dtype=torch.float64))[0] - b, b


# ---------------------------------------------------------------------------------------------------------------
# Time grids
# ---------------------------------------------------------------------------------------------------------------


def test_ddim_timesteps_trailing_and_leading():
    ts = ddim_timesteps(1000, 50)  # trailing is the default
    assert ts.dtype == torch.int64 and len(ts) == 50
    assert ts[0] == 999 and ts[-1] == 19 and torch.all(ts.diff() == -20)
    lead = ddim_timesteps(1000, 50, "leading")
    assert lead[0] == 980 and lead[-1] == 0 and torch.all(lead.diff() == -20)
    # a non-divisible count: round(T − i·T/steps) − 1, still distinct and starting at T − 1
    odd = ddim_timesteps(1000, 30)
    expected = [round(1000 - i * 1000 / 30) - 1 for i in range(30)]
    assert odd.tolist() == expected and odd[0] == 999 and len(set(expected)) == 30
    assert ddim_timesteps(10, 10).tolist() == list(range(9, -1, -1))
    with pytest.raises(ValueError):
        ddim_timesteps(10, 11)


def test_flow_timesteps_grid_and_shift():
    grid = flow_timesteps(8)
    assert len(grid) == 9 and grid[0] == 1.0 and grid[-1] == 0.0
    torch.testing.assert_close(grid.diff(), torch.full((8,), -1 / 8, dtype=torch.float64))
    shifted = flow_timesteps(8, shift=3.0)
    torch.testing.assert_close(shifted, shift_t(grid, 3.0))
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and torch.all(shifted[1:-1] > grid[1:-1])


# ---------------------------------------------------------------------------------------------------------------
# DDPM samplers
# ---------------------------------------------------------------------------------------------------------------


def test_ddim_eta0_is_deterministic_and_eta1_uses_the_generator():
    x, ts = noise(64), ddim_timesteps(T, 20)

    def run(eta, seed):
        return sample_ddim(
            eps_model(), x, ts, alphas_cumprod=AB, eta=eta, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(run(0.0, 1), run(0.0, 2))
    assert torch.equal(run(1.0, 1), run(1.0, 1)) and not torch.allclose(run(1.0, 1), run(1.0, 2))


def test_ddim_reproduces_gaussian_data():
    out = sample_ddim(eps_model(), noise(20_000), ddim_timesteps(T, 250), alphas_cumprod=AB)
    assert_moments(out, MU, SIGMA, mean_tol=0.04, std_rtol=0.04)


def test_ddim_converges_to_the_exact_transport_map():
    """With many steps DDIM is the probability-flow ODE, which maps N(√ᾱ_T·μ, v_T) onto N(μ, σ²) affinely:
    x0 = μ + σ·(x_T − √ᾱ_T·μ)/√v_T with v_T = ᾱ_T·σ² + 1 − ᾱ_T. Started from N(0, I) instead, the output is
    N(μ − σ·√ᾱ_T·μ/√v_T, σ²/v_T): check the deterministic affine map against that, without sampling noise."""
    ab_T = AB[-1].item()
    v_T = ab_T * SIGMA**2 + 1 - ab_T
    A, b = affine_map(lambda x: sample_ddim(eps_model(), x, ddim_timesteps(T, T), alphas_cumprod=AB))
    torch.testing.assert_close(A, SIGMA / v_T.sqrt(), rtol=5e-3, atol=0)
    torch.testing.assert_close(b, MU - SIGMA * math.sqrt(ab_T) * MU / v_T.sqrt(), rtol=0, atol=5e-4)


def test_ddpm_ancestral_reproduces_gaussian_data():
    """Algorithm 2 of Ho et al. on the full grid: every step is the exact Gaussian posterior."""
    out = sample_ddpm(
        eps_model(), noise(10_000), ddim_timesteps(T, T), alphas_cumprod=AB, generator=torch.Generator().manual_seed(1)
    )
    assert_moments(out, MU, SIGMA, mean_tol=0.05, std_rtol=0.04)


def test_ddpm_ancestral_is_reproducible_from_its_generator():
    x, ts = noise(16), ddim_timesteps(T, 10)

    def run(seed):
        return sample_ddpm(eps_model(), x, ts, alphas_cumprod=AB, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3), run(3)) and not torch.allclose(run(3), run(4))


def test_point_mass_data_is_reached_in_one_step():
    """For data concentrated at c the exact ε determines x0 = c, so a single DDIM or DDPM step lands on it."""
    c, zero = torch.tensor([0.7, -2.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    x = noise(8)
    for sampler in (sample_ddim, sample_ddpm):
        out = sampler(eps_model(c, zero), x, ddim_timesteps(T, 1), alphas_cumprod=AB)
        torch.testing.assert_close(out, c.expand_as(out), rtol=0, atol=1e-9)


def test_ddim_callback_sees_every_step_and_the_model_gets_float32_times():
    seen, times = [], []
    model = eps_model()

    def recording_model(x, t):
        times.append(t)
        return model(x, t)

    ts = ddim_timesteps(T, 10)
    out = sample_ddim(recording_model, noise(4), ts, alphas_cumprod=AB, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(10)) and [d["t"] for d in seen] == ts.tolist()
    assert all(t.dtype == torch.float32 and t.shape == (4,) and torch.all(t == s) for t, s in zip(times, ts))
    # the step after the last index lands on ᾱ = 1: the output is the last clean estimate, exactly
    assert torch.equal(seen[-1]["denoised"], out)
    assert torch.equal(seen[0]["x"], noise(4))


def test_ddpm_samplers_reject_unordered_timesteps():
    with pytest.raises(ValueError, match="decreasing"):
        sample_ddim(eps_model(), noise(2), [10, 500], alphas_cumprod=AB)


# ---------------------------------------------------------------------------------------------------------------
# Flow samplers
# ---------------------------------------------------------------------------------------------------------------


def test_flow_euler_reproduces_gaussian_data():
    out = sample_euler(velocity_model(), noise(20_000), flow_timesteps(100))
    assert_moments(out, MU, SIGMA, mean_tol=0.04, std_rtol=0.04)


def test_flow_heun_reproduces_gaussian_data():
    out = sample_heun(velocity_model(), noise(20_000), flow_timesteps(20))
    assert_moments(out, MU, SIGMA, mean_tol=0.03, std_rtol=0.02)


def test_flow_euler_is_first_order_and_heun_second_order():
    """At t = 1 the flow's marginal is exactly N(0, I), so the exact map is x ↦ σ·x + μ: halving the step must
    halve Euler's error and quarter Heun's."""

    def error(sampler, steps):
        A, b = affine_map(lambda x: sampler(velocity_model(), x, flow_timesteps(steps)))
        assert torch.allclose(b, MU, atol=1e-7), "the mean path is straight; any step count follows it"
        return (A - SIGMA).abs()

    euler = error(sample_euler, 20) / error(sample_euler, 40)
    heun = error(sample_heun, 20) / error(sample_heun, 40)
    assert torch.all((euler > 1.8) & (euler < 2.2)), euler
    assert torch.all((heun > 3.5) & (heun < 5.0)), heun


def test_flow_point_mass_is_reached_in_one_euler_step():
    """Rectified flow's paths are straight for a point mass: v = (x − c)/t, so one Euler step from t = 1 is exact."""
    c, zero = torch.tensor([0.7, -2.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    out = sample_euler(velocity_model(c, zero), noise(8), flow_timesteps(1))
    torch.testing.assert_close(out, c.expand_as(out), rtol=0, atol=1e-9)


def test_flow_callback_and_denoised_estimate():
    seen = []
    grid = flow_timesteps(5)
    model = velocity_model()
    sample_euler(model, noise(4), grid, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(5)) and [d["t"] for d in seen] == grid[:-1].tolist()
    for d in seen:  # denoised = x − t·v: the straight-line extrapolation to t = 0
        v = model(d["x"], torch.full((4,), d["t"], dtype=torch.float32))
        torch.testing.assert_close(d["denoised"], d["x"] - d["t"] * v)
    with pytest.raises(ValueError, match="decreasing"):
        sample_heun(model, noise(2), [0.0, 1.0])
