"""Training objectives: what the network predicts, how the predictions convert, and how each step is weighted.

DDPM (Ho et al. 2020): x_t = √ᾱ·x0 + √(1−ᾱ)·ε. The network predicts one of
  eps — the noise ε (Ho et al. 2020),
  v   — the velocity v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022, §4 and Appendix D),
  x0  — the clean sample.
Given (x_t, ᾱ) any one determines the other two; the conversions below are exact mutual inverses.

Rectified flow (Liu et al. 2022; Esser et al. 2024 §2): x_t = (1−t)·x0 + t·ε with t = 0 data, t = 1 noise; the
network predicts the velocity dx_t/dt = ε − x0.

Every function takes ᾱ (or t) as a scalar or a (B,) tensor and broadcasts it over the trailing dims of x.
"""

from __future__ import annotations

from typing import Literal

import torch

Prediction = Literal["eps", "v", "x0"]


def _col(a: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) coefficient as a (B, 1, …, 1) tensor of x's dtype/device, so it broadcasts over x."""
    a = a.to(device=x.device, dtype=x.dtype) if torch.is_tensor(a) else torch.tensor(a, dtype=x.dtype, device=x.device)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _sqrt_ab(ab: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(√ᾱ, √(1−ᾱ)), computed in ᾱ's own precision (float64 tables) before any cast to the data dtype."""
    ab = torch.as_tensor(ab, dtype=torch.float64) if not torch.is_tensor(ab) else ab
    return ab.sqrt(), (1 - ab).sqrt()


# ---------------------------------------------------------------------------------------------------------------
# DDPM: forward process and the eps / v / x0 conversions
# ---------------------------------------------------------------------------------------------------------------


def q_sample(x0: torch.Tensor, eps: torch.Tensor, ab: torch.Tensor | float) -> torch.Tensor:
    """A draw from q(x_t | x0) = N(√ᾱ·x0, (1−ᾱ)·I), Eq. 4 of Ho et al. 2020, with the given noise ε."""
    a, s = _sqrt_ab(ab)
    return _col(a, x0) * x0 + _col(s, x0) * eps


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, ab: torch.Tensor | float) -> torch.Tensor:
    """x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ (Eq. 4 of Ho et al. 2020 solved for x0; Eq. 12 of Song et al. 2021)."""
    a, s = _sqrt_ab(ab)
    return (x_t - _col(s, x_t) * eps) / _col(a, x_t)


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, ab: torch.Tensor | float) -> torch.Tensor:
    """ε = (x_t − √ᾱ·x0)/√(1−ᾱ)."""
    a, s = _sqrt_ab(ab)
    return (x_t - _col(a, x_t) * x0) / _col(s, x_t)


def v_from_eps(x_t: torch.Tensor, eps: torch.Tensor, ab: torch.Tensor | float) -> torch.Tensor:
    """v = √ᾱ·ε − √(1−ᾱ)·x0 with x0 from ε, which simplifies to (ε − √(1−ᾱ)·x_t)/√ᾱ."""
    a, s = _sqrt_ab(ab)
    return (eps - _col(s, x_t) * x_t) / _col(a, x_t)


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, ab: torch.Tensor | float) -> torch.Tensor:
    """ε = √(1−ᾱ)·x_t + √ᾱ·v (Salimans & Ho 2022, Appendix D)."""
    a, s = _sqrt_ab(ab)
    return _col(s, x_t) * x_t + _col(a, x_t) * v


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, ab: torch.Tensor | float) -> torch.Tensor:
    """x0 = √ᾱ·x_t − √(1−ᾱ)·v (Salimans & Ho 2022, Appendix D)."""
    a, s = _sqrt_ab(ab)
    return _col(a, x_t) * x_t - _col(s, x_t) * v


def v_from_x0(x_t: torch.Tensor, x0: torch.Tensor, ab: torch.Tensor | float) -> torch.Tensor:
    """v = √ᾱ·ε − √(1−ᾱ)·x0 with ε from x0, which simplifies to (√ᾱ·x_t − x0)/√(1−ᾱ)."""
    a, s = _sqrt_ab(ab)
    return (_col(a, x_t) * x_t - x0) / _col(s, x_t)


_CONVERSIONS = {
    ("eps", "x0"): x0_from_eps,
    ("x0", "eps"): eps_from_x0,
    ("eps", "v"): v_from_eps,
    ("v", "eps"): eps_from_v,
    ("v", "x0"): x0_from_v,
    ("x0", "v"): v_from_x0,
}


def convert_prediction(
    pred: torch.Tensor, src: Prediction, dst: Prediction, x_t: torch.Tensor, ab: torch.Tensor | float
) -> torch.Tensor:
    """A prediction of kind ``src`` at (x_t, ᾱ) re-expressed as kind ``dst`` (identity when they are equal)."""
    if src == dst:
        return pred
    return _CONVERSIONS[(src, dst)](x_t, pred, ab)


def ddpm_target(prediction: Prediction, x0: torch.Tensor, eps: torch.Tensor, ab: torch.Tensor | float) -> torch.Tensor:
    """What a network of the given prediction type is trained to output for the pair (x0, ε)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    a, s = _sqrt_ab(ab)
    return _col(a, x0) * eps - _col(s, x0) * x0  # v, Salimans & Ho 2022 §4


# ---------------------------------------------------------------------------------------------------------------
# Loss weighting: Min-SNR-γ (Hang et al. 2023)
# ---------------------------------------------------------------------------------------------------------------


def snr(ab: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of x_t: ᾱ/(1−ᾱ) (Kingma et al. 2021, Variational Diffusion Models)."""
    return ab / (1 - ab)


def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction: Prediction) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) for a loss written in the network's own target.

    The weight on the x0-space loss is min(SNR, γ); an eps loss equals SNR × the x0 loss and a v loss equals
    (SNR + 1) × the x0 loss, so the per-target weights are min(SNR,γ)/SNR, min(SNR,γ)/(SNR+1) and min(SNR,γ).
    """
    if prediction == "eps":
        # min(SNR,γ)/SNR written as min(1, γ/SNR): finite (= 1) even where SNR = 0.
        return (gamma / snr_t).clamp(max=1.0)
    if prediction == "v":
        return snr_t.clamp(max=gamma) / (snr_t + 1)
    if prediction == "x0":
        return snr_t.clamp(max=gamma)
    raise ValueError(f"unknown prediction type {prediction!r}")


# ---------------------------------------------------------------------------------------------------------------
# Rectified flow
# ---------------------------------------------------------------------------------------------------------------


def flow_interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1−t)·x0 + t·ε: the straight path from data (t=0) to noise (t=1), Esser et al. 2024 §2 with
    the rectified-flow choice a_t = 1−t, b_t = t."""
    t = _col(t, x0)
    return (1 - t) * x0 + t * eps


def flow_velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The regression target of rectified flow: dx_t/dt = ε − x0 (Liu et al. 2022, Eq. 1)."""
    return eps - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x0 = x_t − t·v: follow the straight line from x_t back to t = 0."""
    return x_t - _col(t, x_t) * v


def eps_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """ε = x_t + (1−t)·v: follow the straight line from x_t forward to t = 1."""
    return x_t + (1 - _col(t, x_t)) * v


__all__ = [
    "Prediction",
    "convert_prediction",
    "ddpm_target",
    "eps_from_v",
    "eps_from_velocity",
    "eps_from_x0",
    "flow_interpolate",
    "flow_velocity_target",
    "min_snr_weight",
    "q_sample",
    "snr",
    "v_from_eps",
    "v_from_x0",
    "x0_from_eps",
    "x0_from_v",
    "x0_from_velocity",
]
