"""Saving and loading trained models: safetensors weights + the typed config that built them, at a URL.

A saved model is a directory (local or s3://) holding ``model.safetensors`` and ``config.json``
({"type": ..., "config": {...}, "weights_sha256": ...}). The config is the commit record: saving removes an existing
one first and writes the new one last, so a directory with a config is complete, and the weights' checksum in it
makes a load refuse weights that are not the ones the config was written with (a torn overwrite, bit rot). Weights
never go through pickle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ldm_core import storage

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def weights_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    """The safetensors bytes a saved model's weights are, whose sha256 is its ``weights_sha256`` (its content hash)."""
    return st_save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """The content hash of weights: the ``weights_sha256`` that `save_weights` records for them. safetensors orders
    tensors itself, so the same tensors give the same hash whatever order they come in."""
    return hashlib.sha256(weights_bytes(state_dict)).hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """The content hash of the model's weights: the ``weights_sha256`` that `save_model` records for them."""
    return state_dict_sha256(model.state_dict())


def save_model(
    url: str,
    model: torch.nn.Module,
    model_type: str,
    config: Any,
    extra: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    return save_weights(url, model.state_dict(), model_type, config, extra, storage_options)


def save_weights(
    url: str,
    state_dict: dict[str, torch.Tensor],
    model_type: str,
    config: Any,
    extra: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """`save_model` for weights that are not one module's whole state dict (a LoRA model's base, its adapter)."""
    data = weights_bytes(state_dict)
    # overwriting: withdraw the old commit record first, so a kill below leaves an incomplete model, never a mix
    storage.remove(storage.join(url, CONFIG), storage_options)
    storage.write_bytes_atomic(storage.join(url, WEIGHTS), data, storage_options)
    meta = {
        "type": model_type,
        "config": config.to_dict() if hasattr(config, "to_dict") else config,
        **(extra or {}),
        "weights_sha256": hashlib.sha256(data).hexdigest(),
    }
    storage.write_text_atomic(storage.join(url, CONFIG), json.dumps(meta, indent=2, sort_keys=True), storage_options)
    return url


def read_model_meta(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        return json.loads(storage.read_text(storage.join(url, CONFIG), storage_options))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no saved model at {url} (missing {CONFIG})") from e


def load_state_dict(
    url: str, storage_options: dict[str, Any] | None = None, expected_sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """The weights at ``url``; with ``expected_sha256`` (the config's record) they must be the recorded ones."""
    weights_url = storage.join(url, WEIGHTS)
    data = storage.read_bytes(weights_url, storage_options)
    if expected_sha256 is not None and (actual := hashlib.sha256(data).hexdigest()) != expected_sha256:
        raise ValueError(
            f"{weights_url}: checksum mismatch (config.json records {expected_sha256[:12]}…, the file "
            f"is {actual[:12]}…): the weights are not the ones this model was saved with"
        )
    return st_load(data)


def load_model(
    url: str,
    expected_type: str,
    build: Callable[[dict[str, Any]], torch.nn.Module],
    storage_options: dict[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> torch.nn.Module:
    meta = read_model_meta(url, storage_options)
    if meta.get("type") != expected_type:
        raise ValueError(f"{url} holds a {meta.get('type')!r}, not a {expected_type!r}")
    model = build(meta["config"])
    # a model whose meta records no weights_sha256 loads unverified
    model.load_state_dict(load_state_dict(url, storage_options, meta.get("weights_sha256")), strict=True)
    return model.to(map_location)
