"""Exact denoisers for Gaussian data, the closed-form oracle of the diffusion tests.

Data x0 ~ N(μ, diag σ²) per dimension. Every noised x_t is then jointly Gaussian with x0 and ε, so each
posterior mean is a linear regression, E[a | x_t] = E[a] + Cov(a, x_t)/Var(x_t)·(x_t − E[x_t]):

  DDPM, x_t = √ᾱ·x0 + √(1−ᾱ)·ε:   Var(x_t) = ᾱσ² + 1−ᾱ,  E[x_t] = √ᾱ·μ,
      E[ε | x_t]  = √(1−ᾱ)·(x_t − √ᾱ·μ) / (ᾱσ² + 1−ᾱ)
      E[x0 | x_t] = μ + √ᾱ·σ²·(x_t − √ᾱ·μ) / (ᾱσ² + 1−ᾱ)
      E[v | x_t]  = √ᾱ·E[ε | x_t] − √(1−ᾱ)·E[x0 | x_t]          (v is linear in (ε, x0))
  Flow, x_t = (1−t)·x0 + t·ε:       Var(x_t) = (1−t)²σ² + t²,  E[x_t] = (1−t)·μ,  Cov(ε − x0, x_t) = t − (1−t)σ²,
      E[ε − x0 | x_t] = −μ + (t − (1−t)σ²)·(x_t − (1−t)·μ) / ((1−t)²σ² + t²)

A sampler driven by these is only as wrong as its discretization, so it must reproduce N(μ, σ²).
Tensors are (N, D); ᾱ and t are scalars or (N,).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Sampling loops run thousands of tiny ops; on a shared 2-core box OpenMP's fork/join per op can cost more
    than the op (we measured 7 ms per 10k-element sqrt under load). One thread keeps these tests fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _col(a, x: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(a, dtype=x.dtype, device=x.device)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def eps_oracle(x: torch.Tensor, ab, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    ab = _col(ab, x)
    return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * sigma**2 + 1 - ab)


def x0_oracle(x: torch.Tensor, ab, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    ab = _col(ab, x)
    return mu + ab.sqrt() * sigma**2 * (x - ab.sqrt() * mu) / (ab * sigma**2 + 1 - ab)


def v_oracle(x: torch.Tensor, ab, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    a = _col(ab, x)
    return a.sqrt() * eps_oracle(x, ab, mu, sigma) - (1 - a).sqrt() * x0_oracle(x, ab, mu, sigma)


def velocity_oracle(x: torch.Tensor, t, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    t = _col(t, x)
    return -mu + (t - (1 - t) * sigma**2) * (x - (1 - t) * mu) / ((1 - t) ** 2 * sigma**2 + t**2)


def assert_moments(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, mean_tol: float, std_rtol: float) -> None:
    """Per-dimension sample mean within mean_tol·σ of μ and sample std within std_rtol of σ."""
    mean, std = x.mean(0), x.std(0)
    assert torch.all((mean - mu).abs() <= mean_tol * sigma), f"mean {mean.tolist()} vs {mu.tolist()}"
    assert torch.all((std / sigma - 1).abs() <= std_rtol), f"std {std.tolist()} vs {sigma.tolist()}"
