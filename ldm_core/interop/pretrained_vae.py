"""A pretrained diffusers ``AutoencoderKL`` (SD's kl-f8, a 16-channel SD3/FLUX-style one) as our stage-1 autoencoder.

Found where `ldm_core.interop.folders` finds a diffusers component (a local folder, ``s3://…``, a repo id in the local
Hugging Face cache), converted exactly by `ldm_core.interop.autoencoder`, and identified by the sha256 of the converted
weights, so that a run can tell "the same autoencoder" from "the same path" (a folder overwritten in place).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ldm_core.config import StrictModel
from ldm_core.interop.autoencoder import autoencoder_from_diffusers, config_from_diffusers
from ldm_core.interop.folders import describe, is_remote, local_copy, local_folder, read_diffusers_config
from ldm_core.model_io import weights_sha256
from ldm_core.models.autoencoder import AutoencoderConfig, AutoencoderKL

DIFFUSERS_CLASS = "AutoencoderKL"


class PretrainedAutoencoderConfig(StrictModel):
    """Start stage 1 from a pretrained diffusers AutoencoderKL instead of training one from scratch."""

    source: str
    """A diffusers ``save_pretrained`` folder: a local path, an fsspec URL (``s3://bucket/sd-vae``), or a Hugging Face
    repo id (``owner/name``) already in the local Hugging Face cache (nothing is downloaded)."""
    subfolder: str | None = None
    """The autoencoder's folder inside the source, e.g. ``vae`` in a whole Stable Diffusion pipeline folder."""
    mode: Literal["frozen", "decoder"] = "frozen"
    """frozen: used as it is, no training. decoder: its decoder is fine-tuned on your images with the stage-1 loss
    while the encoder (so the latent space) stays bitwise fixed, as SD's ft-MSE and ft-EMA decoders were made."""
    latent_scale: Literal["config", "measure"] = "config"
    """Where the latent scale and shift come from: the source's config (``scaling_factor``, ``shift_factor``), or
    measured on your training images (1/std, and the mean as shift when ``use_shift``)."""


@dataclass
class PretrainedAutoencoder:
    model: AutoencoderKL
    """Converted, on CPU, in eval mode; its config carries the source's scaling and shift factors."""
    source: str
    """The source as given (with its subfolder)."""
    weights_sha256: str
    """sha256 of the converted weights as `ldm_core.model_io` saves them (the ``weights_sha256`` it records)."""


def autoencoder_config_of(folder: Path, where: str) -> AutoencoderConfig:
    """Our config for the diffusers model in ``folder``, or a ValueError (one line) when it is not an AutoencoderKL
    we can represent exactly."""
    dcfg = read_diffusers_config(folder)
    found = dcfg.get("_class_name")
    if found != DIFFUSERS_CLASS:
        raise ValueError(
            f"{where} holds a diffusers {found or 'model without _class_name'}, not an "
            f"{DIFFUSERS_CLASS}; only a KL autoencoder can serve as stage 1"
        )
    try:
        return config_from_diffusers(dcfg)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def pretrained_autoencoder_config(source: str, subfolder: str | None = None) -> AutoencoderConfig | None:
    """The config of a local or cached source without loading its weights (run-config validation); None for a remote
    source, which is read when the run starts. Raises as `load_pretrained_autoencoder` does for a missing or
    unsuitable one."""
    if is_remote(source):
        return None
    return autoencoder_config_of(local_folder(source, subfolder), describe(source, subfolder))


def load_pretrained_autoencoder(
    source: str, subfolder: str | None = None, storage_options: dict[str, Any] | None = None
) -> PretrainedAutoencoder:
    """Find, load (diffusers, local files only) and convert the AutoencoderKL at ``source``."""
    try:
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    except ImportError as e:
        raise ImportError(
            f"loading the pretrained autoencoder {describe(source, subfolder)!r} needs the diffusers "
            f"package (pip install 'diffusers>=0.30'): {e}"
        ) from None

    where = describe(source, subfolder)
    with local_copy(source, subfolder, storage_options) as folder:
        autoencoder_config_of(folder, where)  # refuse before loading any weights
        theirs = DiffusersAutoencoderKL.from_pretrained(folder, local_files_only=True)
    ours = autoencoder_from_diffusers(theirs).cpu().eval()
    return PretrainedAutoencoder(model=ours, source=where, weights_sha256=weights_sha256(ours))


__all__ = [
    "PretrainedAutoencoder",
    "PretrainedAutoencoderConfig",
    "autoencoder_config_of",
    "load_pretrained_autoencoder",
    "pretrained_autoencoder_config",
]
