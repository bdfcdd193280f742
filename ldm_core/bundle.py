"""A trained text-to-image model as one self-describing directory: denoiser + frozen VAE + how to sample.

    <url>/denoiser/   model.safetensors + config.json (the denoiser backbone config)
    <url>/denoiser/lora/  a LoRA-trained model's adapter: model.safetensors + config.json (its LoraConfig, and the
                      base it needs: the content hash of denoiser/'s weights and, when known, their source)
    <url>/vae/        model.safetensors + config.json (the autoencoder, with its latent scale)
    <url>/text_encoder/  the text encoder's model + tokenizer (transformers save_pretrained, safetensors)
    <url>/bundle.json diffusion config, latent shape, text encoder config and where its copy came from (source,
                      revision, weights hash), provenance (VAE registry version …)

`load_text_to_image(url)` rebuilds everything from the directory alone: the text encoder from its copy, so a
registered model works where the training machine's paths and Hugging Face cache do not exist (a bundle.json
without ``text_encoder_copy`` loads it by the id/path it records). This is what the MLflow pyfunc,
`ldm sample`, `ldm export` and the evaluation report load; weights never go through pickle.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ldm_core import storage
from ldm_core.diffusion import DiffusionConfig, create_diffusion
from ldm_core.generation import generate
from ldm_core.lora import (
    LoraConfig,
    adapter_state_dict,
    add_lora,
    base_sha256,
    base_state_dict,
    has_lora,
    load_adapter_state_dict,
    lora_config,
)
from ldm_core.model_io import CONFIG, load_model, load_state_dict, read_model_meta, save_model, save_weights
from ldm_core.models.autoencoder import AutoencoderConfig, build_autoencoder
from ldm_core.models.denoiser import build_denoiser, parse_denoiser_config
from ldm_core.text_encoder import (
    SavedTextEncoder,
    TextEncoder,
    TextEncoderConfig,
    save_text_encoder,
    weights_sha256,
)

BUNDLE_FILE = "bundle.json"
LORA_DIR = "lora"
TEXT_ENCODER_DIR = "text_encoder"


def save_autoencoder(
    url: str, model: nn.Module, extra: dict[str, Any] | None = None, storage_options: dict[str, Any] | None = None
) -> str:
    return save_model(url, model, "autoencoder", model.config, extra, storage_options)


def load_autoencoder(
    url: str, storage_options: dict[str, Any] | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    model = load_model(
        url,
        "autoencoder",
        lambda cfg: build_autoencoder(AutoencoderConfig.model_validate(cfg)),
        storage_options,
        device,
    )
    return model.eval().requires_grad_(False)


def save_denoiser(
    url: str,
    model: nn.Module,
    extra: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    base_source: str | None = None,
) -> str:
    """The denoiser at ``url``; one carrying a LoRA adapter as its base there and the adapter in ``lora/``, which
    records the base's content hash and ``base_source`` (where the base came from, e.g. an init_from URI)."""
    # the base's config.json is the commit record of both: withdrawn first, written last
    storage.remove(storage.join(url, CONFIG), storage_options)
    storage.remove(storage.join(url, LORA_DIR, CONFIG), storage_options)
    if not has_lora(model):
        return save_model(url, model, "denoiser", model.config, extra, storage_options)
    save_weights(
        storage.join(url, LORA_DIR),
        adapter_state_dict(model),
        "lora",
        lora_config(model),
        {"base": {"sha256": base_sha256(model), "source": base_source}},
        storage_options,
    )
    return save_weights(
        url, base_state_dict(model), "denoiser", model.config, {**(extra or {}), "lora": LORA_DIR}, storage_options
    )


def load_denoiser(
    url: str, storage_options: dict[str, Any] | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """The denoiser at ``url``, with its LoRA adapter applied when it was saved with one."""
    model = load_model(url, "denoiser", lambda cfg: build_denoiser(parse_denoiser_config(cfg)), storage_options, device)
    meta = read_model_meta(url, storage_options)
    if meta.get("lora"):
        model = load_lora(storage.join(url, meta["lora"]), model, meta["weights_sha256"], storage_options)
    return model.eval().requires_grad_(False)


def load_lora(url: str, base: nn.Module, base_sha: str, storage_options: dict[str, Any] | None = None) -> nn.Module:
    """``base`` (whose weights hash to ``base_sha``) with the adapter saved at ``url`` applied; refused when the
    adapter was trained on other base weights."""
    meta = read_model_meta(url, storage_options)
    needs = meta["base"]
    if needs["sha256"] != base_sha:
        source = f" ({needs['source']})" if needs.get("source") else ""
        raise ValueError(
            f"the LoRA adapter at {url} needs base weights {needs['sha256'][:12]}…{source}; the base "
            f"denoiser beside it is {base_sha[:12]}…"
        )
    with torch.random.fork_rng(devices=[]):  # the fresh adapter's draws are overwritten: leave the caller's RNG be
        model = add_lora(base, LoraConfig.model_validate(meta["config"]))
    load_adapter_state_dict(model, load_state_dict(url, storage_options, meta["weights_sha256"]))
    return model


@dataclass
class TextToImage:
    vae: nn.Module
    denoiser: nn.Module
    text_encoder: TextEncoder
    diffusion_config: DiffusionConfig
    latent_shape: tuple[int, int, int]
    guidance: float = 4.0
    info: dict[str, Any] = field(default_factory=dict)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
    ) -> np.ndarray:
        return generate(
            prompts,
            self.vae,
            self.denoiser,
            self.text_encoder,
            create_diffusion(self.diffusion_config),
            self.latent_shape,
            steps=steps,
            guidance=self.guidance if guidance is None else guidance,
            seed=seed,
            sampler=sampler,
            batch_size=batch_size,
            device=device,
        )


def _save_text_encoder_copy(url: str, encoder: TextEncoder, storage_options: dict[str, Any] | None) -> SavedTextEncoder:
    """The encoder's save_pretrained folder, written locally and copied to ``url`` file by file (any fsspec URL)."""
    storage.remove(url, storage_options, recursive=True)  # no file of an earlier copy may survive beside this one
    with tempfile.TemporaryDirectory() as tmp:
        saved = save_text_encoder(encoder, tmp)
        for f in sorted(Path(tmp).iterdir()):
            storage.write_bytes_atomic(storage.join(url, f.name), f.read_bytes(), storage_options)
    return saved


def save_text_to_image(
    url: str,
    *,
    denoiser: nn.Module,
    vae: nn.Module,
    diffusion_config: DiffusionConfig,
    text_encoder_config: TextEncoderConfig,
    latent_shape: Sequence[int],
    guidance: float = 4.0,
    info: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    base_source: str | None = None,
    text_encoder: TextEncoder | None = None,
) -> str:
    """base_source: where a LoRA-trained denoiser's base came from (recorded beside its adapter).
    text_encoder: the loaded encoder of ``text_encoder_config``, to copy into the bundle (loaded here when not
    given)."""
    # overwriting: withdraw the old commit record first, so a kill midway leaves no bundle rather than a mixed one
    storage.remove(storage.join(url, BUNDLE_FILE), storage_options)
    save_denoiser(storage.join(url, "denoiser"), denoiser, storage_options=storage_options, base_source=base_source)
    save_autoencoder(storage.join(url, "vae"), vae, storage_options=storage_options)
    encoder = text_encoder or TextEncoder(text_encoder_config)
    if encoder.config != text_encoder_config:
        raise ValueError(f"text_encoder was loaded with {encoder.config}, the bundle records {text_encoder_config}")
    copy = _save_text_encoder_copy(storage.join(url, TEXT_ENCODER_DIR), encoder, storage_options)
    meta = {
        "format": "ldm-text-to-image/1",
        "diffusion": diffusion_config.to_dict(),
        "text_encoder": text_encoder_config.to_dict(),
        "text_encoder_copy": copy.to_dict(),
        "latent_shape": list(latent_shape),
        "guidance": guidance,
        "info": info or {},
    }
    # written last: a directory with bundle.json is complete
    storage.write_text_atomic(
        storage.join(url, BUNDLE_FILE), json.dumps(meta, indent=2, sort_keys=True), storage_options
    )
    return url


def load_text_to_image(
    url: str, storage_options: dict[str, Any] | None = None, device: str | torch.device = "cpu"
) -> TextToImage:
    try:
        meta = json.loads(storage.read_text(storage.join(url, BUNDLE_FILE), storage_options))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no text-to-image bundle at {url} (missing {BUNDLE_FILE})") from e
    return TextToImage(
        vae=load_autoencoder(storage.join(url, "vae"), storage_options, device),
        denoiser=load_denoiser(storage.join(url, "denoiser"), storage_options, device),
        text_encoder=_load_text_encoder(url, meta, storage_options, device),
        diffusion_config=DiffusionConfig.model_validate(meta["diffusion"]),
        latent_shape=tuple(meta["latent_shape"]),
        guidance=float(meta.get("guidance", 4.0)),
        info=meta.get("info", {}),
    )


def _load_text_encoder(
    url: str, meta: dict[str, Any], storage_options: dict[str, Any] | None, device: str | torch.device
) -> TextEncoder:
    """From the bundle's copy, after checking its weights against the recorded hash; by name when it has no copy."""
    config = TextEncoderConfig.model_validate(meta["text_encoder"])
    if "text_encoder_copy" not in meta:
        return TextEncoder(config, device=device)
    copy = SavedTextEncoder.model_validate(meta["text_encoder_copy"])
    copy_url = storage.join(url, TEXT_ENCODER_DIR)
    if storage.is_local(copy_url):
        return _verified_text_encoder(storage.local_path(copy_url), copy, config, device)
    with tempfile.TemporaryDirectory() as tmp:  # transformers loads from a local folder; the weights end up in memory
        for name in storage.list_dir(copy_url, storage_options):
            (Path(tmp) / name).write_bytes(storage.read_bytes(storage.join(copy_url, name), storage_options))
        return _verified_text_encoder(tmp, copy, config, device)


def _verified_text_encoder(
    folder: str, copy: SavedTextEncoder, config: TextEncoderConfig, device: str | torch.device
) -> TextEncoder:
    if (actual := weights_sha256(folder)) != copy.weights_sha256:
        raise ValueError(
            f"{folder}: text encoder weights hash {actual[:12]}…, bundle.json records "
            f"{copy.weights_sha256[:12]}… ({copy.source}): not the copy this bundle was saved with"
        )
    return TextEncoder(config, device=device, path=folder)
