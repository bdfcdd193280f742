"""What `image_dataset` hands downstream."""

from pipeline.upstream import AssetRecord


class ImageDatasetRecord(AssetRecord):
    asset = "image_dataset"

    dataset_url: str
    """The canonical Parquet shards (train and validation splits)."""
    dataset_version: str
    """A hash of the shard manifest: changes when rows are added."""
    photos_url: str | None
    """The natural-photo crops for reconstruction (None: photo_crops 0)."""
    rows_total: int
    bad_fraction: float
    """Bad inputs / inputs examined, over the whole source."""
    check_max_bad_fraction: float
    """The asset check's limit, as configured for this materialization."""
