import mlflow

from pipeline.mlflow_models import TextToImageModel

mlflow.models.set_model(TextToImageModel())
