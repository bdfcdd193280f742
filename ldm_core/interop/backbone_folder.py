"""A diffusers denoiser folder (``save_pretrained``'s layout, local or s3://) -> our backbone.

A folder is either one model (``config.json`` + weights) or a whole pipeline (``model_index.json`` with the
denoiser in ``unet/`` or ``transformer/``); ``subfolder`` names the part, and for a pipeline folder it defaults to
whichever of the two exists. The config's ``_class_name`` picks the conversion (`ldm_core.interop.from_diffusers`),
so the config alone says which of our backbones, of which shape, the weights will become: `backbone_config_of_folder`
reads it without loading a tensor (for checks before any work), `load_backbone_folder` converts the weights.
"""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from ldm_core import storage
from ldm_core.interop import from_diffusers
from ldm_core.interop.folders import local_copy
from ldm_core.interop.mmdit import config_from_diffusers as mmdit_config
from ldm_core.interop.unet import config_from_diffusers as unet_config
from ldm_core.models.denoiser import DenoiserConfig

_CONFIG_FROM = {"UNet2DConditionModel": unet_config, "SD3Transformer2DModel": mmdit_config}
_PIPELINE_PARTS = ("unet", "transformer")  # where a pipeline folder keeps its denoiser (SD-1/2, SD3)


def model_folder(url: str, subfolder: str | None = None, storage_options: dict[str, Any] | None = None) -> str:
    """The folder holding the denoiser's config.json: ``url/subfolder``, or for a pipeline folder without a
    subfolder its ``unet/`` or ``transformer/``. FileNotFoundError (one line) when there is none."""
    if subfolder:
        url = storage.join(url, subfolder)
    elif not storage.exists(storage.join(url, "config.json"), storage_options):
        parts = [p for p in _PIPELINE_PARTS if storage.exists(storage.join(url, p, "config.json"), storage_options)]
        if len(parts) == 1:
            url = storage.join(url, parts[0])
    if not storage.exists(storage.join(url, "config.json"), storage_options):
        raise FileNotFoundError(
            f"{url} is not a diffusers model folder (no config.json); for a pipeline folder, "
            f"set the subfolder of its denoiser ({' or '.join(_PIPELINE_PARTS)})"
        )
    return url


def _read_config(folder: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    config = json.loads(storage.read_text(storage.join(folder, "config.json"), storage_options))
    name = config.get("_class_name")
    if name not in _CONFIG_FROM:
        raise ValueError(
            f"{folder} holds a diffusers {name or 'model without _class_name'}, not a denoiser we "
            f"convert ({', '.join(_CONFIG_FROM)})"
        )
    return config


def backbone_config_of_folder(
    url: str, subfolder: str | None = None, storage_options: dict[str, Any] | None = None
) -> DenoiserConfig:
    """Our denoiser config for the diffusers model in the folder, from its config.json alone (no weights read).
    ValueError names a setting our backbones cannot represent."""
    folder = model_folder(url, subfolder, storage_options)
    config = _read_config(folder, storage_options)
    return _CONFIG_FROM[config["_class_name"]](config)


def load_backbone_folder(
    url: str, subfolder: str | None = None, storage_options: dict[str, Any] | None = None
) -> nn.Module:
    """Our backbone with the weights of the diffusers model in the folder (fp32, on CPU, in training mode)."""
    import diffusers

    folder = model_folder(url, subfolder, storage_options)
    cls = getattr(diffusers, _read_config(folder, storage_options)["_class_name"])
    with local_copy(folder, storage_options=storage_options) as local:  # diffusers reads local folders only
        theirs = cls.from_pretrained(local)
    return from_diffusers(theirs.float()).train()


__all__ = ["backbone_config_of_folder", "load_backbone_folder", "model_folder"]
