"""What `ldm_model` hands downstream."""

from pipeline.upstream import AssetRecord

REGISTERED_NAME = "ldm"


class LdmModelRecord(AssetRecord):
    asset = "ldm_model"

    ldm_url: str
    """The saved text-to-image bundle under the storage root."""
    ldm_uri: str
    """Its registered version, models:/ldm/<n> (alias candidate)."""
    ldm_version: int
    vae_uri: str
    mlflow_run_id: str
    mlflow_model_id: str | None
    """The logged model (MLflow 3) the evaluation's metrics attach to."""
