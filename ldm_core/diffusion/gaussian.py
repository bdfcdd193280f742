"""Discrete-time Gaussian diffusion (DDPM, Ho et al. 2020): the ``kind="ddpm"`` process."""

from __future__ import annotations

from typing import Any

import torch

from ldm_core.diffusion.base import Diffusion, ModelFn, TrainingSample, draw_noise
from ldm_core.diffusion.config import DiffusionConfig
from ldm_core.diffusion.objectives import convert_prediction, ddpm_target, min_snr_weight, q_sample, snr
from ldm_core.diffusion.samplers import DDPM_SAMPLERS, ddim_timesteps
from ldm_core.diffusion.schedules import alphas_cumprod, make_betas
from ldm_core.distributed import SINGLE, BatchShard


class GaussianDiffusion(Diffusion):
    """Discrete-time DDPM (Ho et al. 2020) with an eps, v or x0 network and the DDPM/DDIM samplers."""

    def __init__(self, config: DiffusionConfig):
        super().__init__(config)
        self.betas = make_betas(config.schedule, self.T, config.beta_start, config.beta_end)  # (T,) float64
        self.alphas_cumprod = alphas_cumprod(self.betas)  # (T,) float64, on CPU: indexed per step

    def _ab(self, t_model: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[t_model.detach().round().long().cpu()]  # (B,) float64

    def training_sample(
        self, x0: torch.Tensor, generator: torch.Generator | None = None, shard: BatchShard = SINGLE
    ) -> TrainingSample:
        B = x0.shape[0]
        gen_device = generator.device if generator is not None else "cpu"
        # uniform, Algorithm 1
        t = torch.randint(0, self.T, (B * shard.world_size,), generator=generator, device=gen_device)
        t = shard.take(t).cpu()  # (B,)
        eps = shard.take(draw_noise(shard.global_shape(x0.shape), generator, x0))  # (B, C, H, W)
        ab = self.alphas_cumprod[t]  # (B,) float64
        if self.config.min_snr_gamma is None:
            weight = torch.ones(B)
        else:
            weight = min_snr_weight(snr(ab), self.config.min_snr_gamma, self.config.prediction).float()
        return TrainingSample(
            x_t=q_sample(x0, eps, ab),
            t_model=t.float().to(x0.device),
            target=ddpm_target(self.config.prediction, x0, eps, ab),
            weight=weight.to(x0.device),
        )

    def denoised(self, pred: torch.Tensor, x_t: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        return convert_prediction(pred, self.config.prediction, "x0", x_t, self._ab(t_model))

    def _sampler_inputs(
        self, model: ModelFn, sampler: str, steps: int, eta: float
    ) -> tuple[ModelFn, torch.Tensor, dict[str, Any]]:
        if sampler not in DDPM_SAMPLERS:
            raise ValueError(f"sampler {sampler!r} does not apply to kind 'ddpm'; use one of {DDPM_SAMPLERS}")
        if eta != 0.0 and sampler != "ddim":
            raise ValueError(f"eta only applies to the 'ddim' sampler, not {sampler!r}")
        prediction = self.config.prediction

        def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # The sampler's t is the timestep index, which is also the DDPM network's time.
            pred = model(x, t)
            return pred if prediction == "eps" else convert_prediction(pred, prediction, "eps", x, self._ab(t))

        options: dict[str, Any] = {"alphas_cumprod": self.alphas_cumprod}
        if sampler == "ddim":
            options["eta"] = eta
        return eps_model, ddim_timesteps(self.T, steps, self.config.timestep_spacing), options


__all__ = ["GaussianDiffusion"]
