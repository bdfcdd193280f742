import mlflow

from pipeline.mlflow_models import AutoencoderModel

mlflow.models.set_model(AutoencoderModel())
