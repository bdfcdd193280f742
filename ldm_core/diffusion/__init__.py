"""Diffusion math of stage 2 behind one entry point, ``create_diffusion(config)`` (as in DiT's diffusion package).

The trainer and ``generate()`` see only this surface::

    diffusion = create_diffusion(DiffusionConfig(kind="flow"))
    s = diffusion.training_sample(x0, generator)          # x_t, t_model, target, weight
    loss = diffusion.loss(net(s.x_t, s.t_model, ctx, mask), s)
    x0 = diffusion.sample(cfg_model(net, ctx, mask, uctx, umask, 5.0), noise, generator=g)

``t_model`` is the network's time: the integer timestep index 0..T−1 for DDPM, t·T for flow (SD3's convention;
T = num_train_timesteps = 1000 by default), so both kinds feed the timestep embedding the same [0, T] range.
Nothing here knows the network: any ``model(x, t_model) -> prediction`` plugs in (UNet, MMDiT, a closed form).
The pure pieces live in `schedules`, `objectives`, `samplers` and `guidance`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ldm_core.config import StrictModel
from ldm_core.diffusion.guidance import cfg_model, drop_conditioning
from ldm_core.diffusion.objectives import (
    Prediction,
    convert_prediction,
    ddpm_target,
    flow_interpolate,
    flow_velocity_target,
    min_snr_weight,
    q_sample,
    snr,
    x0_from_velocity,
)
from ldm_core.diffusion.samplers import (
    DDPM_SAMPLERS,
    FLOW_SAMPLERS,
    SAMPLERS,
    Callback,
    Spacing,
    ddim_timesteps,
    flow_timesteps,
)
from ldm_core.diffusion.schedules import (
    DEFAULT_BETA_RANGE,
    Schedule,
    alphas_cumprod,
    make_betas,
    sample_t_logit_normal,
    sample_t_uniform,
    shift_t,
)
from ldm_core.distributed import SINGLE, BatchShard

SamplerName = Literal["ddpm", "ddim", "euler", "heun"]
_DEFAULT_SAMPLER = {"ddpm": "ddim", "flow": "euler"}


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


class DiffusionConfig(StrictModel):
    """The diffusion process of stage 2: forward process, training objective and default sampler."""

    kind: Literal["ddpm", "flow"] = "flow"
    """"ddpm": discrete-time Gaussian diffusion (Ho et al. 2020); "flow": rectified flow (Esser et al. 2024),
    which superseded it."""
    prediction: Prediction = "eps"
    """DDPM only: what the network outputs, the noise ε, the velocity v (Salimans & Ho 2022) or x0."""
    schedule: Schedule = "scaled_linear"
    """DDPM only: the β schedule; "scaled_linear" is Stable Diffusion's, "cosine" Nichol & Dhariwal 2021's."""
    num_train_timesteps: int = Field(1000, ge=2)
    """T: DDPM's number of discrete steps; for flow only the scale of the model time t·T."""
    beta_start: float | None = Field(None, gt=0, lt=1)
    """DDPM linear/scaled_linear only: β at t = 0; None takes the schedule's default (1e-4 / 0.00085)."""
    beta_end: float | None = Field(None, gt=0, lt=1)
    """DDPM linear/scaled_linear only: β at t = T−1; None takes the schedule's default (0.02 / 0.012)."""
    min_snr_gamma: float | None = Field(None, gt=0)
    """DDPM only: Min-SNR-γ loss weighting (Hang et al. 2023; γ = 5 in the paper); None weighs all steps alike."""
    time_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    """Flow only: training distribution of t; logit-normal (SD3 §3.1) favours the hard middle of the path."""
    logit_mean: float = 0.0
    """Flow, logit_normal only: mean of logit(t)."""
    logit_std: float = Field(1.0, gt=0)
    """Flow, logit_normal only: standard deviation of logit(t)."""
    shift: float = Field(1.0, gt=0)
    """Flow only: SD3 timestep shift applied to training times and the sampling grid (3.0 in SD3 at 1024²)."""
    sampler: SamplerName | None = None
    """Default sampler for ``sample``; None means "ddim" for ddpm and "euler" for flow (filled in on validation)."""
    sample_steps: int = Field(50, ge=1)
    """Default number of sampling steps (model evaluations per sample; twice that for heun)."""
    eta: float = Field(0.0, ge=0)
    """DDIM only: noise scale η of Song et al. 2021 Eq. 16; 0 is deterministic, 1 is ancestral."""
    timestep_spacing: Spacing = "trailing"
    """DDPM samplers only: which T/steps-strided indices to visit; "trailing" starts at T−1 (Lin et al. 2024)."""

    @model_validator(mode="after")
    def _check_combination(self) -> DiffusionConfig:
        if self.sampler is None:
            # Resolve the kind-dependent default, so the saved config names the sampler actually used. Written
            # through __dict__: a validated assignment here would re-enter this validator.
            self.__dict__["sampler"] = _DEFAULT_SAMPLER[self.kind]
        ddpm = self.kind == "ddpm"
        if ddpm and self.sampler not in DDPM_SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} integrates a flow; kind 'ddpm' needs one of {DDPM_SAMPLERS}")
        if not ddpm and self.sampler not in FLOW_SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} needs an ᾱ table; kind 'flow' needs one of {FLOW_SAMPLERS}")
        if not ddpm:
            flow_meaningless = {
                "prediction": self.prediction != "eps",
                "min_snr_gamma": self.min_snr_gamma is not None,
                "beta_start": self.beta_start is not None,
                "beta_end": self.beta_end is not None,
            }
            bad = [k for k, v in flow_meaningless.items() if v]
            if bad:
                raise ValueError(f"{bad} only apply to kind 'ddpm' (a flow model predicts the velocity ε − x0)")
        if ddpm and self.shift != 1.0:
            raise ValueError("shift applies to kind 'flow' only")
        if self.eta != 0.0 and self.sampler != "ddim":
            raise ValueError(f"eta only applies to the 'ddim' sampler, not {self.sampler!r}")
        if ddpm and self.sample_steps > self.num_train_timesteps:
            raise ValueError(f"sample_steps {self.sample_steps} exceeds num_train_timesteps {self.num_train_timesteps}")
        if ddpm and self.schedule == "cosine" and (self.beta_start is not None or self.beta_end is not None):
            raise ValueError("the cosine schedule takes no beta_start/beta_end")
        if ddpm and self.schedule != "cosine":
            lo, hi = DEFAULT_BETA_RANGE[self.schedule]
            lo, hi = self.beta_start or lo, self.beta_end or hi
            if lo >= hi:
                raise ValueError(f"beta_start {lo} must be below beta_end {hi}")
        return self


# ---------------------------------------------------------------------------------------------------------------
# The process objects
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSample:
    """One training draw: feed ``net(x_t, t_model, …)`` and regress its output onto ``target``."""

    x_t: torch.Tensor  # (B, C, H, W) the noised input
    t_model: torch.Tensor  # (B,) float32, the network's time
    target: torch.Tensor  # (B, C, H, W) what the network should output
    weight: torch.Tensor  # (B,) float32 per-sample loss weight (Min-SNR or ones)


ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _randn(shape: torch.Size, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    # Drawn on the generator's device and moved: one seed gives the same draw whatever device the data is on.
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=gen_device).to(like.device, like.dtype)


class Diffusion(ABC):
    """A forward process with its objective and samplers; built by `create_diffusion`."""

    def __init__(self, config: DiffusionConfig):
        self.config = config
        self.T = config.num_train_timesteps

    @abstractmethod
    def training_sample(
        self, x0: torch.Tensor, generator: torch.Generator | None = None, shard: BatchShard = SINGLE
    ) -> TrainingSample:
        """Draws t, then the noise (in that order) from ``generator`` and builds the regression pair.

        shard: when x0 is one process's rows of a global batch, t and the noise are drawn for the whole global batch
        and sliced, so N processes draw exactly what one process with the global batch draws."""

    @abstractmethod
    def denoised(self, pred: torch.Tensor, x_t: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        """The clean sample x0 implied by a raw network prediction at (x_t, t_model)."""

    @abstractmethod
    def _sampler_inputs(
        self, model: ModelFn, sampler: str, steps: int, eta: float
    ) -> tuple[ModelFn, torch.Tensor, dict[str, Any]]:
        """(model in the sampler's native form and time, the time grid, sampler options)."""

    def loss(self, pred: torch.Tensor, sample: TrainingSample) -> torch.Tensor:
        """Per-sample MSE over (C, H, W), times the sample's weight, averaged over the batch. Computed in fp32."""
        per_sample = (pred.float() - sample.target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))  # (B,)
        return (per_sample * sample.weight.to(per_sample)).mean()

    def sample(
        self,
        model: ModelFn,
        noise: torch.Tensor,
        steps: int | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
    ) -> torch.Tensor:
        """Integrates from ``noise`` (B, C, H, W) ~ N(0, I) to data with ``model(x, t_model) -> raw prediction``
        (wrap a text-conditioned denoiser with `cfg_model`). Unset arguments take the config's defaults."""
        steps = self.config.sample_steps if steps is None else steps
        sampler = sampler or self.config.sampler
        eta = self.config.eta if eta is None else eta
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
        native_model, timesteps, options = self._sampler_inputs(model, sampler, steps, eta)
        return SAMPLERS[sampler](native_model, noise, timesteps, generator=generator, callback=callback, **options)


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
        eps = shard.take(_randn(shard.global_shape(x0.shape), generator, x0))  # (B, C, H, W)
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
        eps = shard.take(_randn(shard.global_shape(x0.shape), generator, x0))  # (B, C, H, W)
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


def create_diffusion(config: DiffusionConfig | None = None) -> Diffusion:
    """The `Diffusion` a config describes (the default config: rectified flow, logit-normal t, Euler, 50 steps)."""
    config = config or DiffusionConfig()
    return GaussianDiffusion(config) if config.kind == "ddpm" else RectifiedFlow(config)


__all__ = [
    "Diffusion",
    "DiffusionConfig",
    "GaussianDiffusion",
    "RectifiedFlow",
    "TrainingSample",
    "cfg_model",
    "create_diffusion",
    "drop_conditioning",
]
