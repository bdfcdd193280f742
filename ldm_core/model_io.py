"""Saving and loading trained models: safetensors weights + the typed config that built them, at a URL.

A saved model is a directory (local or s3://) holding ``model.safetensors`` and ``config.json``
({"type": ..., "config": {...}}). The config is written last, so a directory with a config is complete; weights
never go through pickle.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ldm_core import storage

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_model(url: str, model: torch.nn.Module, model_type: str, config: Any, extra: dict[str, Any] | None = None,
               storage_options: dict[str, Any] | None = None) -> str:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    storage.write_bytes_atomic(storage.join(url, WEIGHTS), st_save(sd), storage_options)
    meta = {"type": model_type, "config": config.to_dict() if hasattr(config, "to_dict") else config, **(extra or {})}
    storage.write_text_atomic(storage.join(url, CONFIG), json.dumps(meta, indent=2, sort_keys=True), storage_options)
    return url


def read_model_meta(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        return json.loads(storage.read_text(storage.join(url, CONFIG), storage_options))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no saved model at {url} (missing {CONFIG})") from e


def load_state_dict(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    return st_load(storage.read_bytes(storage.join(url, WEIGHTS), storage_options))


def load_model(url: str, expected_type: str, build: Callable[[dict[str, Any]], torch.nn.Module],
               storage_options: dict[str, Any] | None = None, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    meta = read_model_meta(url, storage_options)
    if meta.get("type") != expected_type:
        raise ValueError(f"{url} holds a {meta.get('type')!r}, not a {expected_type!r}")
    model = build(meta["config"])
    model.load_state_dict(load_state_dict(url, storage_options), strict=True)
    return model.to(map_location)
