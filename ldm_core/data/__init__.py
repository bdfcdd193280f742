"""Data: ingestion of user image–caption sources into canonical Parquet shards, the dataset that reads them, and
the embedded default sources (coloured shapes, scikit-image photo crops)."""

from ldm_core.data.dataset import ImageShardDataset
from ldm_core.data.ingest import IngestConfig, IngestError, IngestResult, ingest
from ldm_core.data.photos import write_photo_crops_source
from ldm_core.data.synthetic import write_shapes_source

__all__ = [
    "ImageShardDataset",
    "IngestConfig",
    "IngestError",
    "IngestResult",
    "ingest",
    "write_photo_crops_source",
    "write_shapes_source",
]
