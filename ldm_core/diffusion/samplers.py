"""Samplers: from noise to data, in the style of k-diffusion's sampling.py.

Every sampler has one signature::

    sample_xxx(model, x, timesteps, *, generator=None, callback=None, **options) -> x

- ``model(x, t) -> prediction`` is a plain callable in the sampler's native form: ε for the DDPM samplers, the
  velocity ε − x0 for the flow samplers. ``t`` is a (B,) float32 tensor holding the entry of ``timesteps``
  (integer index 0..T−1 for DDPM, t ∈ [0, 1] for flow); mapping it to the network's own time convention and
  converting other prediction types is the caller's job (`create_diffusion` does both).
- ``x`` is the starting noise, any shape (B, …).
- ``timesteps``: for DDPM, a strictly decreasing sequence of integer indices into the ᾱ table (`ddim_timesteps`);
  the step after the last one lands on ᾱ = 1, i.e. returns the clean prediction. For flow, a decreasing time grid
  that includes both ends, 1 … 0 (`flow_timesteps`), like k-diffusion's sigmas with their trailing 0.
- ``generator`` supplies every random draw (stochastic samplers only), so a seed fixes the result.
- ``callback`` receives ``{"i", "t", "x", "denoised"}`` once per step, with x before the step and the current
  estimate of the clean sample (for previews and tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from ldm_core.diffusion.schedules import shift_t

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]
Spacing = Literal["leading", "trailing"]


# ---------------------------------------------------------------------------------------------------------------
# Time grids
# ---------------------------------------------------------------------------------------------------------------


def ddim_timesteps(T: int, steps: int, spacing: Spacing = "trailing") -> torch.Tensor:
    """``steps`` decreasing timestep indices out of 0..T−1 for a strided DDPM/DDIM sampler. Returns (steps,) int64.

    "trailing" (the default) starts at T−1, the noisiest trained step, and strides down to about T/steps − 1.
    "leading", the original DDIM/SD-1 spacing ``range(0, T, T//steps)`` reversed, starts at T − T/steps: the first
    model call treats pure noise as a less noisy x_t than it is, which hurts few-step sampling (Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed"). SD's config adds ``steps_offset=1`` to
    "leading"; that offset is not applied here.
    """
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if spacing == "trailing":
        ts = (T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round() - 1
    elif spacing == "leading":
        ts = (torch.arange(steps, dtype=torch.float64) * (T // steps)).flip(0)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected 'leading' or 'trailing'")
    return ts.long()


def flow_timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """A time grid from 1 (noise) to 0 (data) with ``steps`` intervals, warped by the SD3 shift.

    Uniform in t before the shift; shift > 1 spends more steps near the noise end (Esser et al. 2024 §5.3.2).
    Returns (steps + 1,) float64, both ends included.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_t(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _time_batch(t: float, x: torch.Tensor) -> torch.Tensor:
    # float32 even when x is bf16: bf16 cannot tell timestep 999 from 1000.
    return torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Drawn on the generator's device and moved, so a CPU seed gives the same noise for a CUDA x.
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=torch.float32).to(x.device, x.dtype)


def _ddpm_pairs(
    timesteps: Sequence[int] | torch.Tensor, alphas_cumprod: torch.Tensor
) -> list[tuple[int, float, float]]:
    """(t, ᾱ_t, ᾱ_prev) per step; the last step's ᾱ_prev is 1 (the clean sample)."""
    ts = [int(t) for t in timesteps]
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"DDPM timesteps must be strictly decreasing, got {ts}")
    ab = alphas_cumprod.double().tolist()
    return [(t, ab[t], ab[ts[i + 1]] if i + 1 < len(ts) else 1.0) for i, t in enumerate(ts)]


def _flow_pairs(timesteps: Sequence[float] | torch.Tensor) -> list[tuple[float, float]]:
    ts = [float(t) for t in timesteps]
    if len(ts) < 2 or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"flow timesteps must be a decreasing grid with both ends, got {ts}")
    return list(zip(ts, ts[1:]))


# ---------------------------------------------------------------------------------------------------------------
# DDPM samplers (eps-model, ᾱ table)
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddpm(
    model: Model,
    x: torch.Tensor,
    timesteps: Sequence[int] | torch.Tensor,
    *,
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling, Algorithm 2 of Ho et al. 2020, with σ_t² = β̃_t (the posterior variance, Eq. 7).

    On a strided grid the per-step β is β' = 1 − ᾱ_t/ᾱ_prev, which makes each step the exact posterior
    q(x_prev | x_t, x0 = x̂0); on the full grid it is Algorithm 2 verbatim. The last step adds no noise.
    """
    for i, (t, ab, ab_prev) in enumerate(_ddpm_pairs(timesteps, alphas_cumprod)):
        eps = model(x, _time_batch(t, x))
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)})
        alpha = ab / ab_prev
        beta = 1 - alpha
        mean = (x - beta / math.sqrt(1 - ab) * eps) / math.sqrt(alpha)  # Algorithm 2, line 4
        var = (1 - ab_prev) / (1 - ab) * beta  # β̃, Eq. 7 of Ho et al.; 0 on the last step
        x = mean + math.sqrt(var) * _randn_like(x, generator) if var > 0 else mean
    return x


@torch.no_grad()
def sample_ddim(
    model: Model,
    x: torch.Tensor,
    timesteps: Sequence[int] | torch.Tensor,
    *,
    alphas_cumprod: torch.Tensor,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM, Eq. 12 of Song et al. 2021, with σ_t(η) of their Eq. 16.

    η = 0 is the deterministic DDIM (no noise drawn: the result depends on x alone); η = 1 is the ancestral
    DDPM posterior on the same grid.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    for i, (t, ab, ab_prev) in enumerate(_ddpm_pairs(timesteps, alphas_cumprod)):
        eps = model(x, _time_batch(t, x))
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)  # "predicted x0" of Eq. 12
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": x0})
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))  # Eq. 16
        # max(0, ·): for η > 1 the coefficient of the ε direction would be imaginary; clip it to 0.
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(0.0, 1 - ab_prev - sigma**2)) * eps
        if sigma > 0:
            x = x + sigma * _randn_like(x, generator)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Flow samplers (velocity model, time grid 1 → 0)
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(
    model: Model,
    x: torch.Tensor,
    timesteps: Sequence[float] | torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dt = v(x, t) from t = 1 to 0 (Liu et al. 2022 §2;
    the sampler of Esser et al. 2024). Deterministic: ``generator`` is accepted for the common signature."""
    for i, (t, t_next) in enumerate(_flow_pairs(timesteps)):
        v = model(x, _time_batch(t, x))
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": x - t * v})
        x = x + (t_next - t) * v
    return x


@torch.no_grad()
def sample_heun(
    model: Model,
    x: torch.Tensor,
    timesteps: Sequence[float] | torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Heun's 2nd-order method, Algorithm 1 of Karras et al. 2022 applied to the velocity ODE.

    Unlike Karras (whose derivative (x − D(x))/σ is undefined at σ = 0) the velocity is finite at t = 0, so the
    correction is applied on every step, the last included: 2 model calls per step.
    """
    for i, (t, t_next) in enumerate(_flow_pairs(timesteps)):
        v = model(x, _time_batch(t, x))
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": x - t * v})
        dt = t_next - t
        v_next = model(x + dt * v, _time_batch(t_next, x))  # slope at the Euler predictor
        x = x + dt * 0.5 * (v + v_next)
    return x


# The registry of samplers, by the process they integrate. Adding a sampler is one entry here: the names a config
# accepts (`SamplerName`) and the per-kind lists (`DDPM_SAMPLERS`, `FLOW_SAMPLERS`) are derived from it.
_DDPM_FAMILY: dict[str, Callable[..., torch.Tensor]] = {"ddpm": sample_ddpm, "ddim": sample_ddim}
_FLOW_FAMILY: dict[str, Callable[..., torch.Tensor]] = {"euler": sample_euler, "heun": sample_heun}
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {**_DDPM_FAMILY, **_FLOW_FAMILY}
DDPM_SAMPLERS = tuple(_DDPM_FAMILY)
FLOW_SAMPLERS = tuple(_FLOW_FAMILY)
SamplerName = Literal[*SAMPLERS]
"""A sampler's name as a config field accepts it: pydantic refuses any name the registry lacks."""

__all__ = [
    "DDPM_SAMPLERS",
    "FLOW_SAMPLERS",
    "SAMPLERS",
    "SamplerName",
    "ddim_timesteps",
    "flow_timesteps",
    "sample_ddim",
    "sample_ddpm",
    "sample_euler",
    "sample_heun",
]
