"""The run config of `evaluation_report` (``ops.evaluation_report.config``).

The bounds of its plain fields are declared on the fields; the ldm_core sections (``training``, ``store``, …) mirror
ldm_core's models (`pipeline.config_bridge`), which bound their own fields. `validation.py` beside it checks a run
config's section against this same class before any work starts.
"""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from ldm_core.evaluation.evaluate import EvaluationConfig
from pipeline.config_bridge import dagster_config

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
