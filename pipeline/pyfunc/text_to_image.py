"""The registered `ldm` model's pyfunc: predict(DataFrame with `prompt` [, `seed`, `steps`, `guidance`]) → uint8
images (N, H, W, 3).

A request is bounded (ldm_core.request_limits): 1..64 rows, steps 1..1000, guidance finite in 0..50, seeds integers
in 0..2**63-1, prompts of at most 10 000 characters; beyond, it is refused whole with one line naming the field. A
missing or NaN cell means the model's default (pandas marks a missing number NaN).

Logged "from code": MLflow stores this file with the model and runs it at load time, with the model's `code/`
(a copy of ldm_core) first on sys.path. So it imports only ldm_core and pinned third-party packages, never
`pipeline`: a serving environment has the model's requirements installed, not this project.
"""

from typing import Any

import mlflow
import numpy as np
import pandas as pd

from ldm_core.bundle import load_text_to_image
from ldm_core.request_limits import check_request


class TextToImageModel(mlflow.pyfunc.PythonModel):
    """Each row's image depends only on its prompt, seed (default: the row index), steps and guidance."""

    _skip_type_hint_validation = True  # the schema is the signature logged with the model, not type hints

    def load_context(self, context):
        self.model = load_text_to_image(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):
        df = _as_frame(model_input)
        if "prompt" not in df.columns:
            raise ValueError("input needs a 'prompt' column (strings)")
        n = len(df)

        def column(name: str) -> list[Any]:
            return [v if _present(v) else None for v in df.get(name, [None] * n)]

        given_seeds, steps, guid = check_request(
            list(df["prompt"]), column("seed"), column("steps"), column("guidance")
        )
        seeds = [i if s is None else s for i, s in enumerate(given_seeds)]
        # one image per row from its own seed, so an image never depends on what else is in the request
        out = [
            self.model.generate([str(df["prompt"].iloc[i])], seed=seeds[i], steps=steps[i], guidance=guid[i])[0]
            for i in range(n)
        ]
        return np.stack(out)  # check_request refused an empty request


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


mlflow.models.set_model(TextToImageModel())
