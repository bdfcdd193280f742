"""Embeddings both denoiser backbones share: the sinusoidal timestep features and the MLP on them.

One home for them, below `unet` and `mmdit`, so neither backbone imports the other. The class keeps its attribute
names (fc1, fc2), which are the state-dict keys of every checkpoint and of the diffusers conversions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_PERIOD = 10_000  # longest period of the sinusoidal features (as in the Transformer and DDPM)


def timestep_embedding(t: Tensor, dim: int, max_period: float = MAX_PERIOD) -> Tensor:
    """Sinusoidal features of (possibly fractional) times: [cos(t f_k), sin(t f_k)], f_k = max_period^(-k/(dim/2)).

    Cos first and exponent k/half are LDM's `timestep_embedding`, i.e. diffusers'
    Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0). The frequencies span periods 2pi..2pi·max_period,
    made for t on a 0..1000 scale. (B,) -> (B, dim), fp32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class TimestepEmbedder(nn.Module):
    """MLP on the sinusoidal features: the time conditioning vector (every UNet residual block receives it; the MMDiT
    adds the pooled-text vector to it)."""

    def __init__(self, freq_dim: int, embed_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, embed_dim)
        self.fc2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, t: Tensor) -> Tensor:
        features = timestep_embedding(t, self.freq_dim).to(self.fc1.weight.dtype)  # (B, freq_dim)
        return self.fc2(F.silu(self.fc1(features)))  # (B, embed_dim)


__all__ = ["MAX_PERIOD", "TimestepEmbedder", "timestep_embedding"]
