"""The run config of `image_dataset` (``ops.image_dataset.config``).

The bounds of its plain fields are declared on the fields; the ldm_core sections (``training``, ``store``, …) mirror
ldm_core's models (`pipeline.config_bridge`), which bound their own fields. `validation.py` beside it checks a run
config's section against this same class before any work starts.
"""

from __future__ import annotations

import dagster as dg
from pydantic import Field, field_validator

from ldm_core import storage
from ldm_core.data import IngestConfig
from ldm_core.data.synthetic import MIN_SHAPE_SIZE
from pipeline.config_bridge import dagster_config

BUILTIN_SHAPES = "builtin://shapes"
"""The source of the embedded default dataset (generated shapes with captions)."""
PHOTOS_DATASET = "photos"
"""The dataset name of the natural-photo crops (<storage>/datasets/photos), which no user dataset may take."""


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
