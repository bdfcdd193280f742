"""A denoiser's starting weights (a warm start): where they come from, what network they are, and whether they fit.

`InitWeights` is what every source resolves to: the backbone config the weights belong to, the weights themselves
(our parameter names), a description of the source and a content hash of the weights. The hash is the source's
identity: the pipeline keys checkpoints on it (a warm start never resumes a from-scratch run, or a warm start from
other weights) and records it, so a run can be checked to have started from exactly these weights.

Sources here: a saved denoiser (``ldm_core.model_io``'s layout: a registered model's bundle holds one) and a diffusers
``UNet2DConditionModel`` / ``SD3Transformer2DModel`` folder (`ldm_core.interop.backbone_folder`). Before training, the
weights are checked against the data: `shape_mismatches` against the latents and the text encoder,
`architecture_differences` against a network the run config describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ldm_core.bundle import load_denoiser
from ldm_core.interop.backbone_folder import load_backbone_folder
from ldm_core.lora import merged
from ldm_core.model_io import load_state_dict, read_model_meta, state_dict_sha256
from ldm_core.models.denoiser import DenoiserConfig, parse_denoiser_config, takes_pooled
from ldm_core.models.mmdit import MMDiTConfig
from ldm_core.storage import redact_url

# fields of a backbone config that change how it is computed, not which network (and weights) it is
_NOT_ARCHITECTURE = frozenset({"gradient_checkpointing"})


@dataclass(frozen=True)
class InitWeights:
    config: DenoiserConfig
    """The backbone the weights belong to (the network a warm start trains)."""
    state_dict: dict[str, torch.Tensor]
    """The weights, by our parameter names."""
    source: str
    """Where they came from, for people: a folder URL, ``models:/ldm/3``."""
    sha256: str
    """`ldm_core.model_io.state_dict_sha256` of ``state_dict`` (what a saved denoiser records as its
    ``weights_sha256``): the same weights from any source give the same hash."""


def _init_weights(config: DenoiserConfig, state_dict: dict[str, torch.Tensor], source: str) -> InitWeights:
    # fp32 on CPU, as the trainer builds the model: a half-precision folder hashes as the weights it trains from
    state = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state_dict.items()}
    return InitWeights(config=config, state_dict=state, source=redact_url(source), sha256=state_dict_sha256(state))


def from_saved_denoiser(
    url: str, source: str | None = None, storage_options: dict[str, Any] | None = None
) -> InitWeights:
    """The weights of a saved denoiser (``save_denoiser``'s directory, e.g. a bundle's ``denoiser/``), checksum
    verified. ``source``: how to name it (default: the URL)."""
    meta = read_model_meta(url, storage_options)
    if meta.get("type") != "denoiser":
        raise ValueError(f"{url} holds a {meta.get('type')!r}, not a denoiser")
    if meta.get("lora"):  # a LoRA-trained model's network is its base with the adapter merged in
        model = merged(load_denoiser(url, storage_options))
        return _init_weights(model.config, model.state_dict(), source or url)
    state = load_state_dict(url, storage_options, meta.get("weights_sha256"))
    return _init_weights(parse_denoiser_config(meta["config"]), state, source or url)


def from_diffusers_folder(
    url: str, subfolder: str | None = None, storage_options: dict[str, Any] | None = None
) -> InitWeights:
    """The weights of a diffusers UNet2DConditionModel or SD3Transformer2DModel folder (local or s3://; see
    `ldm_core.interop.backbone_folder` for ``subfolder``), converted to our backbone."""
    model = load_backbone_folder(url, subfolder, storage_options)
    source = f"{url.rstrip('/')}/{subfolder}" if subfolder else url
    return _init_weights(model.config, model.state_dict(), source)


def architecture_differences(init: DenoiserConfig, configured: DenoiserConfig) -> list[str]:
    """The fields in which the init weights' network differs from the configured one ("patch_size 2 vs 4"), empty
    when they are the same network (settings that only change how it is computed aside)."""
    if init.kind != configured.kind:
        return [f"kind {init.kind} vs {configured.kind}"]
    a, b = init.to_dict(), configured.to_dict()
    return [f"{k} {a[k]} vs {b[k]}" for k in sorted(a) if k not in _NOT_ARCHITECTURE and a[k] != b.get(k)]


def shape_mismatches(
    config: DenoiserConfig,
    latent_shape: tuple[int, int, int],
    context_dim: int,
    pooled_dim: int | None,
    source: str = "init_from",
) -> list[str]:
    """What stops a denoiser of ``config`` from training on these latents and text embeddings, one line each naming
    both sides: "init_from has context_dim 768; the store's text encoder gives 384".

    latent_shape: (C, h, w) of one latent. context_dim: the text encoder's token width. pooled_dim: its pooled
    vector's width (None: the store has no pooled vectors), checked for a backbone that takes one (the MMDiT)."""
    channels, h, w = latent_shape
    errors = []
    if off := [
        f"{name} {getattr(config, name)}"
        for name in ("in_channels", "out_channels")
        if getattr(config, name) != channels
    ]:
        errors.append(f"{source} has {', '.join(off)}; the store's latents have {channels} channels")
    if config.context_dim != context_dim:
        errors.append(f"{source} has context_dim {config.context_dim}; the store's text encoder gives {context_dim}")
    if takes_pooled(config) and pooled_dim is not None and config.pooled_dim != pooled_dim:
        errors.append(
            f"{source} takes pooled vectors of width {config.pooled_dim}; the store's text encoder gives {pooled_dim}"
        )
    if isinstance(config, MMDiTConfig):
        p = config.patch_size
        if h % p or w % p:
            errors.append(f"{source} has patch_size {p}; the store's latents are {h}x{w}, not a multiple of it")
        elif max(h, w) > p * config.pos_embed_max_size:
            errors.append(
                f"{source} has positions for latents up to {p * config.pos_embed_max_size} per side "
                f"(pos_embed_max_size {config.pos_embed_max_size} x patch_size {p}); the store's latents "
                f"are {h}x{w}"
            )
    else:
        factor = 2 ** (len(config.channel_mult) - 1)
        if h % factor or w % factor:
            errors.append(
                f"{source} has {len(config.channel_mult)} levels (downsamples by {factor}); the store's "
                f"latents are {h}x{w}, not a multiple of it"
            )
    return errors


__all__ = [
    "InitWeights",
    "architecture_differences",
    "from_diffusers_folder",
    "from_saved_denoiser",
    "shape_mismatches",
]
