"""Run-config validation of `image_dataset` (see `pipeline.validation`)."""

from ldm_core.data.ingest import IngestConfig
from pipeline.defs.image_dataset.config import BUILTIN_SHAPES, ImageDatasetConfig
from pipeline.validation import RunConfigValidation

CONFIG = ImageDatasetConfig


def validate(v: RunConfigValidation) -> None:
    """Its ingest section; resolves ``builtin_count``, the images a generated dataset holds (None: a real source), for
    the trainers' batch sizes."""
    if not v.present("image_dataset"):
        return
    section = v.section("image_dataset")
    source = section.get("source") or BUILTIN_SHAPES
    v.core(IngestConfig, {**(section.get("ingest") or {}), "source": source}, "image_dataset.ingest")
    if section.get("source", BUILTIN_SHAPES) == BUILTIN_SHAPES:
        count = section.get("builtin_count", ImageDatasetConfig.model_fields["builtin_count"].default)
        v.resolved["builtin_count"] = count if isinstance(count, int) else None


def batch_size_error(v: RunConfigValidation, asset: str, batch_size: int) -> str | None:
    """A trainer's batch that the generated dataset cannot fill (every step needs a full batch)."""
    count = v.resolved.get("builtin_count")
    if count is not None and count < batch_size:
        return (
            f"{asset}.training.trainer.batch_size: {batch_size} is more than the {count} images "
            "image_dataset.builtin_count generates (every step needs a full batch)"
        )
    return None
