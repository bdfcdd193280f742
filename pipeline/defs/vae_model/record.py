"""What `vae_model` hands downstream."""

from typing import Any

from pipeline.upstream import AssetRecord

REGISTERED_NAME = "ldm-vae"


class VaeModelRecord(AssetRecord):
    asset = "vae_model"

    vae_url: str
    """The saved autoencoder (safetensors + config + latent scale) under the storage root."""
    vae_uri: str
    """Its registered version, models:/ldm-vae/<n>."""
    vae_version: int
    latent_shape: tuple[int, int, int]
    """(channels, height, width) of a latent at ``resolution``."""
    resolution: int
    mlflow_run_id: str
    materialization_key: str
    """A hash of the dataset version and config: the same key reuses this materialization."""
    val_psnr: float
    psnr_floor: float
    fidelity: dict[str, Any]
    """`ldm_core.evaluation.fidelity.FidelityReport.to_dict()` of the held-out reconstructions."""
    fidelity_thresholds: dict[str, Any]
