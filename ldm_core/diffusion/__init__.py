"""Diffusion math of stage 2 behind one entry point, ``create_diffusion(config)`` (as in DiT's diffusion package).

The trainer and ``generate()`` see only this surface::

    diffusion = create_diffusion(DiffusionConfig(kind="flow"))
    s = diffusion.training_sample(x0, generator)          # x_t, t_model, target, weight
    loss = diffusion.loss(net(s.x_t, s.t_model, ctx, mask), s)
    x0 = diffusion.sample(cfg_model(net, ctx, mask, uctx, umask, 5.0), noise, generator=g)

``t_model`` is the network's time: the integer timestep index 0..T−1 for DDPM, t·T for flow (SD3's convention;
T = num_train_timesteps = 1000 by default), so both kinds feed the timestep embedding the same [0, T] range.
Nothing here knows the network: any ``model(x, t_model) -> prediction`` plugs in (UNet, MMDiT, a closed form).
One module per process, as DiT's ``gaussian_diffusion.py``: `gaussian` (DDPM) and `flow` (rectified flow), both
implementing `base.Diffusion` and built from `config.DiffusionConfig`. The pure pieces live in `schedules`,
`objectives`, `samplers` and `guidance`.
"""

from __future__ import annotations

from ldm_core.diffusion.base import Diffusion, ModelFn, TrainingSample
from ldm_core.diffusion.config import DiffusionConfig
from ldm_core.diffusion.flow import RectifiedFlow
from ldm_core.diffusion.gaussian import GaussianDiffusion
from ldm_core.diffusion.guidance import cfg_model, drop_conditioning
from ldm_core.diffusion.samplers import SamplerName

# The process of each `DiffusionConfig.kind`. The config cannot derive its kinds from this table (the processes
# import the config), so a test checks that the two name the same kinds.
DIFFUSIONS: dict[str, type[Diffusion]] = {"ddpm": GaussianDiffusion, "flow": RectifiedFlow}


def create_diffusion(config: DiffusionConfig | None = None) -> Diffusion:
    """The `Diffusion` a config describes (the default config: rectified flow, logit-normal t, Euler, 50 steps)."""
    config = config or DiffusionConfig()
    return DIFFUSIONS[config.kind](config)


__all__ = [
    "DIFFUSIONS",
    "Diffusion",
    "DiffusionConfig",
    "GaussianDiffusion",
    "ModelFn",
    "RectifiedFlow",
    "SamplerName",
    "TrainingSample",
    "cfg_model",
    "create_diffusion",
    "drop_conditioning",
]
