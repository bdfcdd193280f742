"""The typed config of stage 2's diffusion process: which process, its objective and its default sampler."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ldm_core.config import StrictModel
from ldm_core.diffusion.objectives import Prediction
from ldm_core.diffusion.samplers import DDPM_SAMPLERS, FLOW_SAMPLERS, SamplerName, Spacing
from ldm_core.diffusion.schedules import DEFAULT_BETA_RANGE, Schedule

_DEFAULT_SAMPLER = {"ddpm": "ddim", "flow": "euler"}


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


__all__ = ["DiffusionConfig"]
