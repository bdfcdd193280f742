"""The run config of each asset: its Dagster ``Config`` class, with the bounds of its plain fields declared on the
fields themselves.

The asset modules take their config from here and `pipeline.validation` validates a whole run config against these
same classes before any work starts, so a field, its default and its bound are written once. The ldm_core sections
(``training``, ``store``, ``evaluation``, …) mirror ldm_core's models (`pipeline.config_bridge`), which bound their
own fields.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import Field, field_validator

from ldm_core import storage
from ldm_core.data import IngestConfig
from ldm_core.data.latent_store.schema import LatentStoreConfig
from ldm_core.data.synthetic import MIN_SHAPE_SIZE
from ldm_core.evaluation.evaluate import EvaluationConfig
from ldm_core.evaluation.fidelity import FidelityThresholds
from ldm_core.interop.pretrained_vae import PretrainedAutoencoderConfig
from ldm_core.text_encoder import TextEncoderConfig
from ldm_core.trainers.autoencoder import AutoencoderTrainingConfig
from ldm_core.trainers.ldm import LDMTrainingConfig
from pipeline.config_bridge import dagster_config

BUILTIN_SHAPES = "builtin://shapes"
"""The source of the embedded default dataset (generated shapes with captions)."""
PHOTOS_DATASET = "photos"
"""The dataset name of the natural-photo crops (<storage>/datasets/photos), which no user dataset may take."""

# ---------------------------------------------------------------------------------------------------------------
# image_dataset
# ---------------------------------------------------------------------------------------------------------------

IngestSection = dagster_config(IngestConfig, exclude=("source",))


class ImageDatasetConfig(dg.Config):
    source: str = Field(
        default=BUILTIN_SHAPES,
        description="fsspec URL of the image–caption source (local path, "
        "file://, s3://…), or builtin://shapes for the embedded default dataset.",
    )
    name: str = Field(default="default", description="Dataset name: shards land in <storage>/datasets/<name>.")
    builtin_count: int = Field(default=2000, ge=1, description="builtin://shapes: number of images to generate.")
    builtin_seed: int = Field(default=0, description="builtin://shapes: generator seed (same seed, same images).")
    builtin_size: int = Field(default=32, ge=MIN_SHAPE_SIZE, description="builtin://shapes: image side in pixels.")
    photo_crops: int = Field(
        default=8,
        ge=0,
        description="Crops per scikit-image photo for the natural-image "
        "reconstruction set (<storage>/datasets/photos); 0 skips it.",
    )
    photo_size: int = Field(default=32, ge=MIN_SHAPE_SIZE, description="Side of the photo crops.")
    check_max_bad_fraction: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Asset check: the fraction of bad "
        "inputs must stay below this (ingestion itself fails above "
        "ingest.max_bad_fraction).",
    )
    ingest: IngestSection = Field(
        default_factory=IngestSection,  # type: ignore[valid-type]
        description="Ingestion options (ldm_core IngestConfig).",
    )

    @field_validator("name")
    @classmethod
    def _name_stays_under_datasets(cls, v: str) -> str:
        name = storage.contained_path(v)
        if name is None:
            raise ValueError(
                f"{v!r} is not a relative folder name under <storage>/datasets (no absolute path, no '..', no URL)"
            )
        if name == PHOTOS_DATASET:
            raise ValueError(f"{v!r} is the natural-photo crops' dataset; choose another name")
        return name


# ---------------------------------------------------------------------------------------------------------------
# vae_model
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# latent_store
# ---------------------------------------------------------------------------------------------------------------

StoreSection = dagster_config(LatentStoreConfig)
TextSection = dagster_config(TextEncoderConfig)


class LatentStoreAssetConfig(dg.Config):
    store: StoreSection = Field(
        default_factory=StoreSection,  # type: ignore[valid-type]
        description="Latent store options (backend, dtype, content, batch).",
    )
    text_encoder: TextSection = Field(
        default_factory=TextSection,  # type: ignore[valid-type]
        description="Frozen text encoder (any transformers id or path).",
    )
    check_std_tolerance: float = Field(
        default=0.35, gt=0, description="Asset check: scaled latents must have std within 1 ± this."
    )
    check_sample_rows: int = Field(default=512, ge=1, description="Asset check: rows read to check the latents.")


# ---------------------------------------------------------------------------------------------------------------
# ldm_model
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# evaluation_report
# ---------------------------------------------------------------------------------------------------------------

EvalSection = dagster_config(EvaluationConfig)


class EvaluationReportConfig(dg.Config):
    evaluation: EvalSection = Field(
        default_factory=EvalSection,  # type: ignore[valid-type]
        description="Metrics, sample sizes, grid and gate.",
    )
    guidance: float | None = Field(
        default=None, ge=0, description="Guidance scale for the samples (default: the model's)."
    )
    steps: int | None = Field(default=None, ge=1, description="Sampler steps (default: the model's diffusion config).")
    held_out_images: int = Field(default=256, ge=1, description="Held-out images loaded for reconstruction and FID.")
    photo_images: int = Field(default=64, ge=0, description="Natural-photo crops reconstructed (0 skips).")


ASSET_CONFIGS: dict[str, type[dg.Config]] = {
    "image_dataset": ImageDatasetConfig,
    "vae_model": VaeModelConfig,
    "latent_store": LatentStoreAssetConfig,
    "ldm_model": LdmModelConfig,
    "evaluation_report": EvaluationReportConfig,
}
"""Asset key -> its config class (the run config's ``ops.<asset>.config``)."""
