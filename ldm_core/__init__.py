"""ldm_core: the pure-PyTorch half of ldm-pipeline.

Models, losses, diffusion math, training loops, data, the latent store, evaluation and diffusers interop.
This package never imports dagster or mlflow: orchestration and tracking reach it through small interfaces
(`ldm_core.tracking.Tracker`, fsspec URLs), so the same code runs in a test, a notebook or a Dagster asset.
"""

__version__ = "0.1.0"
