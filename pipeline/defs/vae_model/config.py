"""The run config of `vae_model` (``ops.vae_model.config``).

The bounds of its plain fields are declared on the fields; the ldm_core sections (``training``, ``store``, …) mirror
ldm_core's models (`pipeline.config_bridge`), which bound their own fields. `validation.py` beside it checks a run
config's section against this same class before any work starts.
"""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from ldm_core.evaluation.fidelity import FidelityThresholds
from ldm_core.interop.pretrained_vae import PretrainedAutoencoderConfig
from ldm_core.trainers.autoencoder import AutoencoderTrainingConfig
from pipeline.config_bridge import dagster_config

VaeTrainingSection = dagster_config(AutoencoderTrainingConfig)
FidelitySection = dagster_config(FidelityThresholds)
PretrainedVaeSection = dagster_config(PretrainedAutoencoderConfig)


class VaeModelConfig(dg.Config):
    training: VaeTrainingSection = Field(
        default_factory=VaeTrainingSection,  # type: ignore[valid-type]
        description="Stage-1 training config (model, discriminator, loss, trainer).",
    )
    resolution: int = Field(
        default=32, ge=1, description="Training image side (images are resized and center-cropped)."
    )
    latent_scale_samples: int = Field(
        default=512, ge=1, description="Images encoded to measure the latent scale 1/std."
    )
    use_shift: bool = Field(default=False, description="Also store the latent mean as a shift (SD3 style).")
    psnr_images: int = Field(
        default=256, ge=1, description="Held-out images reconstructed for the PSNR and fidelity checks."
    )
    psnr_floor: float = Field(
        default=15.0, description="Asset check: held-out reconstruction PSNR (dB) must reach this."
    )
    fidelity: FidelitySection = Field(
        default_factory=FidelitySection,  # type: ignore[valid-type]
        description="Asset check (blocking): per-colour accuracy, worst-decile PSNR and channel shift of held-out "
        "reconstructions.",
    )
    cache_images: bool = Field(default=True, description="Keep decoded training images in memory (small datasets).")
    pretrained: PretrainedVaeSection | None = Field(
        default=None,  # type: ignore[valid-type]
        description="Start from a pretrained diffusers AutoencoderKL instead of training one: mode 'frozen' uses it "
        "as is (the training section is not used), 'decoder' fine-tunes its decoder with the training "
        "section (whose model comes from the source: leave training.model unset). Unset: train from "
        "scratch.",
    )
