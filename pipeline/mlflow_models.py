"""MLflow pyfunc wrappers: the registered `ldm` text-to-image model and the `ldm-vae` autoencoder.

They are logged "from code" (pipeline/pyfunc/*.py), so no pickle is written or loaded.

Both carry their weights as an artifact directory written by ldm_core (safetensors + config), so loading a
registry version in a fresh process needs only this package: ``mlflow.pyfunc.load_model("models:/ldm@champion")``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from ldm_core.bundle import TextToImage, load_text_to_image

class TextToImageModel(mlflow.pyfunc.PythonModel):
    """predict(DataFrame with `prompt` [, `seed`, `steps`, `guidance`]) → uint8 images (N, H, W, 3).

    Each row's image depends only on its prompt, seed (default: the row index), steps and guidance.
    """

    _skip_type_hint_validation = True  # the schema is the signature logged with the model, not type hints

    def load_context(self, context):
        from ldm_core.bundle import load_text_to_image

        self.model = load_text_to_image(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):
        df = _as_frame(model_input)
        if "prompt" not in df.columns:
            raise ValueError("input needs a 'prompt' column (strings)")
        n = len(df)
        seeds = [int(s) if _present(s) else i for i, s in enumerate(df.get("seed", [None] * n))]
        steps = [int(s) if _present(s) else None for s in df.get("steps", [None] * n)]
        guid = [float(g) if _present(g) else None for g in df.get("guidance", [None] * n)]
        # one image per row from its own seed, so an image never depends on what else is in the request
        out = [self.model.generate([str(df["prompt"].iloc[i])], seed=seeds[i], steps=steps[i], guidance=guid[i])[0]
               for i in range(n)]
        return np.stack(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and np.isnan(v))


def _as_frame(model_input: Any) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict):
        return pd.DataFrame({k: v if isinstance(v, list) else [v] for k, v in model_input.items()})
    if isinstance(model_input, (list, tuple)):
        return pd.DataFrame({"prompt": list(model_input)})
    if isinstance(model_input, str):
        return pd.DataFrame({"prompt": [model_input]})
    raise TypeError(f"unsupported input type {type(model_input).__name__}")


def text_to_image_signature(height: int, width: int) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([
            ColSpec("string", "prompt"),
            ColSpec("long", "seed", required=False),
            ColSpec("long", "steps", required=False),
            ColSpec("double", "guidance", required=False),
        ]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, height, width, 3))]),
    )


class AutoencoderModel(mlflow.pyfunc.PythonModel):
    """predict(float32 images (N, 3, H, W) in [−1, 1]) → reconstructions, same shape (through the posterior mean)."""

    _skip_type_hint_validation = True

    def load_context(self, context):
        from ldm_core.bundle import load_autoencoder

        self.vae = load_autoencoder(context.artifacts["vae"])

    def predict(self, context, model_input, params=None):
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.vae.decode_latents(self.vae.encode_latents(x)).clamp(-1, 1).numpy()


def autoencoder_signature(channels: int, size: int) -> ModelSignature:
    spec = TensorSpec(np.dtype(np.float32), (-1, channels, size, size))
    return ModelSignature(inputs=Schema([spec]), outputs=Schema([spec]))


PYFUNC_DIR = Path(__file__).parent / "pyfunc"
TEXT_TO_IMAGE_CODE = str(PYFUNC_DIR / "text_to_image.py")
AUTOENCODER_CODE = str(PYFUNC_DIR / "autoencoder.py")


def download_text_to_image(model_uri: str, dst: str) -> TextToImage:
    """The text-to-image model of a registered version (``models:/ldm/3``), downloaded to ``dst`` and loaded with
    ldm_core directly: loading it as a pyfunc would run its code copy inside this process."""
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst)
    bundle = Model.load(local).flavors["python_function"]["artifacts"]["bundle"]["path"]
    return load_text_to_image(os.path.join(local, bundle))
