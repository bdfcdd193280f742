"""How the pipeline logs its MLflow pyfunc models: the registered `ldm` text-to-image model and the `ldm-vae`
autoencoder — their entry points, signatures, input examples, the code shipped with them and their pinned
requirements — and how it reads a registered `ldm` version back.

Both are logged "from code" (pipeline/pyfunc/*.py), so no pickle is written or loaded. Both carry their weights as an
artifact directory written by ldm_core (safetensors + config) and ldm_core itself under the model's `code/`, and pin
the exact versions of what that code imports. So `mlflow models predict|serve` or
``mlflow.pyfunc.load_model("models:/ldm@champion")`` work in an environment built from the model's requirements
alone, without this project installed.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

import ldm_core
from ldm_core.bundle import TextToImage, load_text_to_image

PYFUNC_DIR = Path(__file__).parent / "pyfunc"
TEXT_TO_IMAGE_CODE = str(PYFUNC_DIR / "text_to_image.py")
AUTOENCODER_CODE = str(PYFUNC_DIR / "autoencoder.py")
# copied into the model's code/ directory, which MLflow puts first on sys.path when it loads the model
CODE_PATHS = [str(Path(ldm_core.__file__).parent)]

# The distributions that the pyfunc entry points and the ldm_core modules they load import directly (their own
# dependencies follow from these). The text encoder's weights and tokenizer travel inside the model (its bundle), so
# no package that ships weights is needed; peft applies a LoRA model's adapter. Some packages import others only when
# those are installed, so the served environment gets the ones it was tested with: transformers imports torchvision,
# and peft's accelerate imports boto3.
AUTOENCODER_PACKAGES = ("mlflow", "torch", "numpy", "pydantic", "safetensors", "fsspec")
TEXT_TO_IMAGE_PACKAGES = (
    *AUTOENCODER_PACKAGES,
    "pandas",
    "pillow",
    "transformers",
    "tokenizers",
    "torchvision",
    "peft",
    "boto3",
)


def pinned_requirements(packages: tuple[str, ...]) -> list[str]:
    """``name==version`` of each package as installed here: the environment the model was trained and tested in."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in packages]


def text_to_image_signature(height: int, width: int) -> ModelSignature:
    """One image per row; the values are bounded by ldm_core.request_limits (rows 1..MAX_ROWS, steps 1..MAX_STEPS,
    guidance finite in 0..MAX_GUIDANCE, seed 0..MAX_SEED, prompts up to MAX_PROMPT_CHARS), which the model applies."""
    return ModelSignature(
        inputs=Schema(
            [
                ColSpec("string", "prompt"),
                ColSpec("long", "seed", required=False),
                ColSpec("long", "steps", required=False),
                ColSpec("double", "guidance", required=False),
            ]
        ),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, height, width, 3))]),
    )


def text_to_image_input_example(prompt: str) -> pd.DataFrame:
    # few sampler steps: MLflow runs the example through the model when it logs it, to check that it serves
    return pd.DataFrame({"prompt": [prompt], "seed": np.array([0], np.int64), "steps": np.array([2], np.int64)})


def autoencoder_signature(channels: int, size: int) -> ModelSignature:
    spec = TensorSpec(np.dtype(np.float32), (-1, channels, size, size))
    return ModelSignature(inputs=Schema([spec]), outputs=Schema([spec]))


def autoencoder_input_example(channels: int, size: int) -> np.ndarray:
    return np.zeros((1, channels, size, size), np.float32)


def download_text_to_image(model_uri: str, dst: str) -> TextToImage:
    """The text-to-image model of a registered version (``models:/ldm/3``), downloaded to ``dst`` and loaded with
    ldm_core directly: loading it as a pyfunc would run its code copy inside this process."""
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst)
    bundle = Model.load(local).flavors["python_function"]["artifacts"]["bundle"]["path"]
    return load_text_to_image(os.path.join(local, bundle))
