"""The run config of `latent_store` (``ops.latent_store.config``).

The bounds of its plain fields are declared on the fields; the ldm_core sections (``training``, ``store``, …) mirror
ldm_core's models (`pipeline.config_bridge`), which bound their own fields. `validation.py` beside it checks a run
config's section against this same class before any work starts.
"""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from ldm_core.data.latent_store.schema import LatentStoreConfig
from ldm_core.text_encoder import TextEncoderConfig
from pipeline.config_bridge import dagster_config

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
