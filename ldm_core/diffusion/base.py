"""What every diffusion process offers the trainer and ``generate()``: `Diffusion` and the `TrainingSample` it draws."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ldm_core.diffusion.config import DiffusionConfig
from ldm_core.diffusion.samplers import SAMPLERS, Callback
from ldm_core.distributed import SINGLE, BatchShard


@dataclass(frozen=True)
class TrainingSample:
    """One training draw: feed ``net(x_t, t_model, …)`` and regress its output onto ``target``."""

    x_t: torch.Tensor  # (B, C, H, W) the noised input
    t_model: torch.Tensor  # (B,) float32, the network's time
    target: torch.Tensor  # (B, C, H, W) what the network should output
    weight: torch.Tensor  # (B,) float32 per-sample loss weight (Min-SNR or ones)


ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def draw_noise(shape: torch.Size, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise of ``shape`` in ``like``'s dtype and device."""
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


__all__ = ["Diffusion", "ModelFn", "TrainingSample", "draw_noise"]
