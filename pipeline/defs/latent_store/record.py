"""What `latent_store` hands downstream."""

from typing import Any

from pipeline.upstream import AssetRecord


class LatentStoreRecord(AssetRecord):
    asset = "latent_store"

    store_url: str
    store_version: str
    """A hash of the store's shard list (names and checksums): changes when rows are added."""
    vae_uri: str
    """The registered autoencoder whose latents these are."""
    vae_url: str
    rows_total: int
    latent_shape: tuple[int, int, int]
    text_encoder: str
    """The text encoder's identity (name and weights hash) that embedded the captions."""
    text_encoder_config: dict[str, Any]
    context_dim: int
    check_std_tolerance: float
    check_sample_rows: int
