"""Rectified flow (Liu et al. 2022; Esser et al. 2024): the ``kind="flow"`` process."""

from __future__ import annotations

from typing import Any

import torch

from ldm_core.diffusion.base import Diffusion, ModelFn, TrainingSample, draw_noise
from ldm_core.diffusion.objectives import flow_interpolate, flow_velocity_target, x0_from_velocity
from ldm_core.diffusion.samplers import FLOW_SAMPLERS, flow_timesteps
from ldm_core.diffusion.schedules import sample_t_logit_normal, sample_t_uniform, shift_t
from ldm_core.distributed import SINGLE, BatchShard


class RectifiedFlow(Diffusion):
    """Rectified flow x_t = (1−t)·x0 + t·ε with a velocity network (Liu et al. 2022; Esser et al. 2024)."""

    def _t(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        c = self.config
        if c.time_sampling == "uniform":
            t = sample_t_uniform(n, generator, device)
        else:
            t = sample_t_logit_normal(n, c.logit_mean, c.logit_std, generator, device)
        return shift_t(t, c.shift)  # (n,) float32 in [0, 1]

    def training_sample(
        self, x0: torch.Tensor, generator: torch.Generator | None = None, shard: BatchShard = SINGLE
    ) -> TrainingSample:
        t = shard.take(self._t(x0.shape[0] * shard.world_size, generator, x0.device))  # (B,)
        eps = shard.take(draw_noise(shard.global_shape(x0.shape), generator, x0))  # (B, C, H, W)
        return TrainingSample(
            x_t=flow_interpolate(x0, eps, t),
            t_model=t * self.T,
            target=flow_velocity_target(x0, eps),
            weight=torch.ones_like(t),
        )

    def denoised(self, pred: torch.Tensor, x_t: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        return x0_from_velocity(x_t, pred, t_model / self.T)

    def _sampler_inputs(
        self, model: ModelFn, sampler: str, steps: int, eta: float
    ) -> tuple[ModelFn, torch.Tensor, dict[str, Any]]:
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(f"sampler {sampler!r} does not apply to kind 'flow'; use one of {FLOW_SAMPLERS}")
        if eta != 0.0:
            raise ValueError("eta only applies to the 'ddim' sampler of kind 'ddpm'")

        def velocity_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(x, t * self.T)  # sampler time t ∈ [0, 1] -> network time t·T

        return velocity_model, flow_timesteps(steps, self.config.shift), {}


__all__ = ["RectifiedFlow"]
