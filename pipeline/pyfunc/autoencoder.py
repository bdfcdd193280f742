"""The registered `ldm-vae` model's pyfunc: predict(float32 images (N, 3, H, W) in [−1, 1]) → reconstructions, same
shape (through the posterior mean).

Logged "from code" like text_to_image.py, and for the same reason imports only ldm_core and pinned packages.
"""

import mlflow
import numpy as np
import torch

from ldm_core.bundle import load_autoencoder


class AutoencoderModel(mlflow.pyfunc.PythonModel):
    _skip_type_hint_validation = True

    def load_context(self, context):
        self.vae = load_autoencoder(context.artifacts["vae"])

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.vae.decode_latents(self.vae.encode_latents(x)).clamp(-1, 1).numpy()


mlflow.models.set_model(AutoencoderModel())
