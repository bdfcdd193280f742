"""Run-config validation of `latent_store` (see `pipeline.validation`)."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig

from ldm_core.data.latent_store.schema import LatentStoreConfig
from ldm_core.text_encoder import TextEncoderConfig, resolve_model_path, widths_from_config
from pipeline.defs.latent_store.config import LatentStoreAssetConfig
from pipeline.validation import RunConfigValidation

CONFIG = LatentStoreAssetConfig


def validate(v: RunConfigValidation) -> None:
    """Its store and text encoder sections against the autoencoder; resolves ``store`` (the store's config),
    ``text`` (the text encoder's) and ``widths`` (its token and pooled widths, None when unknown here)."""
    v.resolved.update(store=None, text=None, widths=None)
    if not v.present("latent_store"):
        return
    section = v.section("latent_store")
    store = dict(section.get("store") or {})
    store.setdefault("resolution", v.resolved.get("resolution"))
    store_cfg = v.core(LatentStoreConfig, store, "latent_store.store")
    text = v.core(TextEncoderConfig, section.get("text_encoder"), "latent_store.text_encoder")
    vae = v.resolved.get("vae")
    if store_cfg is not None and vae is not None and store_cfg.resolution % vae.model.downsample_factor:
        v.errors.append(
            f"latent_store.store.resolution: {store_cfg.resolution} is not divisible by the "
            f"autoencoder's downsampling factor {vae.model.downsample_factor}"
        )
    v.resolved.update(store=store_cfg, text=text, widths=_text_widths(text) if text is not None else None)


def _text_widths(text: Any) -> tuple[int, int] | None:
    """(token width, pooled width) of a text encoder from its config alone (no weights loaded); None when it cannot
    be read."""
    try:
        return widths_from_config(AutoConfig.from_pretrained(resolve_model_path(text.name)))
    except Exception:  # not available here (a hub id offline): the asset checks it when it loads the encoder
        return None
