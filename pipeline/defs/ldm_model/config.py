"""The run config of `ldm_model` (``ops.ldm_model.config``), and the denoiser shapes upstream dictates.

The bounds of its plain fields are declared on the fields; the ldm_core sections (``training``, ``store``, …) mirror
ldm_core's models (`pipeline.config_bridge`), which bound their own fields. `validation.py` beside it checks a run
config's section against this same class before any work starts.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import Field

from ldm_core.trainers.ldm import LDMTrainingConfig
from pipeline.config_bridge import dagster_config

LdmTrainingSection = dagster_config(LDMTrainingConfig)
DEFAULT_PROMPTS = [
    "a large red circle in the center",
    "a small blue square in the top left",
    "a large green triangle in the bottom right",
    "a small yellow circle in the top right",
]


class LdmModelConfig(dg.Config):
    training: LdmTrainingSection = Field(
        default_factory=LdmTrainingSection,  # type: ignore[valid-type]
        description="Stage-2 training config (denoiser, diffusion, trainer).",
    )
    guidance: float = Field(
        default=4.0, ge=0, description="Classifier-free guidance scale stored with the model (its default at sampling)."
    )
    validation_prompts: list[str] = Field(
        default=DEFAULT_PROMPTS, description="Prompts of the validation grids sent to MLflow."
    )
    validation_seeds: int = Field(default=4, ge=1, description="Samples per validation prompt.")
    init_from: str | None = Field(
        default=None,
        description="The denoiser's starting weights: none (unset: from "
        "scratch); auto (the champion models:/ldm@champion when it is the same network as training.denoiser and was "
        "trained on the latent store's autoencoder, else from scratch, with the reason recorded: what the retrain "
        "sensor and the weekly schedule ask for); a registered model (models:/ldm@champion, models:/ldm/3); or a "
        "diffusers UNet2DConditionModel / SD3Transformer2DModel folder (local or s3://). With weights, the network "
        "is theirs: leave training.denoiser unset, or it must describe the same network.",
    )
    init_subfolder: str | None = Field(
        default=None,
        description="init_from a diffusers pipeline folder: the "
        "denoiser's subfolder (unet, transformer); unset: whichever of the two the folder has.",
    )


def complete_ldm_training(
    section: dict[str, Any], latent_channels: int | None, context_dim: int | None = None, pooled_dim: int | None = None
) -> dict[str, Any]:
    """The ldm_model training section with the shapes upstream dictates filled in where the run config leaves them
    unset: the latent channels (the autoencoder's), the token width (the text encoder's) and, for the MMDiT, the
    pooled vector's width. None: not known yet, left to the denoiser's config."""
    data = dict(section)
    den = {k: v for k, v in (data.get("denoiser") or {}).items() if v is not None}
    for name, value in (
        ("in_channels", latent_channels),
        ("out_channels", latent_channels),
        ("context_dim", context_dim),
    ):
        if value is not None:
            den.setdefault(name, value)
    if den.get("kind") == "mmdit" and pooled_dim is not None:
        den.setdefault("pooled_projection_dim", pooled_dim)
    data["denoiser"] = den
    return data
