"""Noise schedules: DDPM β tables and flow-matching time distributions.

The β tables are computed in float64 and returned as float64 tensors: ᾱ is a product of up to a thousand factors
close to 1, and its tail (ᾱ_T ≈ 4e-5 for the linear schedule) loses digits in float32. Callers cast where used.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Schedule = Literal["linear", "scaled_linear", "cosine"]

# (beta_start, beta_end) of each schedule when the config leaves them unset: Ho et al. 2020 for "linear",
# Stable Diffusion's v1 config for "scaled_linear".
DEFAULT_BETA_RANGE: dict[str, tuple[float, float]] = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
}


# ---------------------------------------------------------------------------------------------------------------
# DDPM: β_t for t = 0..T-1 (index 0 is the least noisy step)
# ---------------------------------------------------------------------------------------------------------------


def betas_linear(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """β linear in t, the schedule of Ho et al. 2020 §4. Returns (T,) float64."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def betas_scaled_linear(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """√β linear in t: Stable Diffusion's "scaled_linear" (Rombach et al. 2022 configs). Returns (T,) float64."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def betas_cosine(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule, Eq. 17 of Nichol & Dhariwal 2021: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2).

    β_t = 1 − ᾱ(t+1)/ᾱ(t), clipped at ``max_beta`` to avoid the singularity at t = T. Returns (T,) float64.
    """
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 − β_s) (Ho et al. 2020 §2), in float64."""
    return torch.cumprod(1 - betas.double(), dim=0)


def make_betas(
    schedule: Schedule, T: int, beta_start: float | None = None, beta_end: float | None = None
) -> torch.Tensor:
    """The β table of a named schedule; ``None`` bounds take the schedule's defaults (cosine takes none)."""
    if schedule == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("the cosine schedule is defined by its formula; beta_start/beta_end must be unset")
        return betas_cosine(T)
    lo, hi = DEFAULT_BETA_RANGE[schedule]
    lo, hi = (lo if beta_start is None else beta_start), (hi if beta_end is None else beta_end)
    return betas_linear(T, lo, hi) if schedule == "linear" else betas_scaled_linear(T, lo, hi)


# ---------------------------------------------------------------------------------------------------------------
# Flow matching: the training-time distribution of t ∈ [0, 1] (t = 0 data, t = 1 noise)
# ---------------------------------------------------------------------------------------------------------------


def _rand(fn, n: int, generator: torch.Generator | None, device: torch.device | str | None) -> torch.Tensor:
    # Draw on the generator's own device, then move: the same seed gives the same times on CPU and on GPU.
    gen_device = generator.device if generator is not None else "cpu"
    return fn(n, generator=generator, device=gen_device).to(device or "cpu")


def sample_t_uniform(
    n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """t ~ U[0, 1): the rectified-flow default (Liu et al. 2022). Returns (n,) float32."""
    return _rand(torch.rand, n, generator, device)


def sample_t_logit_normal(
    n: int,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """t = sigmoid(u), u ~ N(mean, std²): logit-normal sampling, Esser et al. 2024 (SD3) §3.1.

    It puts more training steps at intermediate t, where the velocity is hardest to predict. Returns (n,) float32.
    """
    return torch.sigmoid(mean + std * _rand(torch.randn, n, generator, device))


def shift_t(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3 timestep shift, Esser et al. 2024 §5.3.2: t' = shift·t / (1 + (shift − 1)·t).

    Maps 0→0 and 1→1 and moves mass toward noise for shift > 1 (needed at high resolution, where more pixels
    carry more signal at the same t). shift = 1 is the identity.
    """
    return shift * t / (1 + (shift - 1) * t)


__all__ = [
    "DEFAULT_BETA_RANGE",
    "Schedule",
    "alphas_cumprod",
    "betas_cosine",
    "betas_linear",
    "betas_scaled_linear",
    "make_betas",
    "sample_t_logit_normal",
    "sample_t_uniform",
    "shift_t",
]
