"""Run-config validation of `ldm_model` (see `pipeline.validation`): its training section, and the denoiser's shapes
against the latents and text embeddings the latent store will hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm_core import storage
from ldm_core.init_weights import shape_mismatches
from ldm_core.interop.backbone_folder import backbone_config_of_folder
from ldm_core.models.mmdit import MMDiTConfig
from ldm_core.trainers.ldm import LDMTrainingConfig
from pipeline.defs.image_dataset.validation import batch_size_error
from pipeline.defs.ldm_model.config import LdmModelConfig, complete_ldm_training
from pipeline.init_from import AUTO, NONE, REGISTERED_PREFIX
from pipeline.validation import RunConfigValidation

CONFIG = LdmModelConfig


def validate(v: RunConfigValidation) -> None:
    section = v.section("ldm_model")
    den_set = {k: x for k, x in ((section.get("training") or {}).get("denoiser") or {}).items() if x is not None}
    vae, store_cfg, widths = v.resolved.get("vae"), v.resolved.get("store"), v.resolved.get("widths")
    ldm = _training(v, section, vae)
    _check_text_widths(v, den_set, widths)
    # the denoiser's shapes against the latents the store will hold (encoded at the store's resolution)
    latent_resolution = store_cfg.resolution if store_cfg is not None else v.resolved.get("resolution")
    if vae is not None and not latent_resolution % vae.model.downsample_factor:
        factor = vae.model.downsample_factor
        if ldm is not None:
            v.errors.extend(_denoiser_shape_errors(ldm.denoiser, latent_resolution, factor))
        if widths is not None:
            side = latent_resolution // factor
            v.errors.extend(
                _init_from_errors(
                    section.get("init_from"), section.get("init_subfolder"), (vae.model.z_channels, side, side), widths
                )
            )
    if vae is not None and ldm is not None:
        for name in ("in_channels", "out_channels"):
            if name in den_set and den_set[name] != vae.model.z_channels:
                v.errors.append(
                    f"ldm_model.training.denoiser.{name}: {den_set[name]}, but the autoencoder's "
                    f"latents have {vae.model.z_channels} channels (vae_model.training.model.z_channels); "
                    "leave it unset"
                )
    if ldm is not None and store_cfg is not None and ldm.trainer.sample_posterior and store_cfg.content != "moments":
        v.errors.append(
            f"ldm_model.training.trainer.sample_posterior: draws from the stored posterior, but "
            f"latent_store.store.content is {store_cfg.content!r} (one fixed sample per image); set it to "
            "'moments'"
        )
    if ldm is not None and (error := batch_size_error(v, "ldm_model", ldm.trainer.batch_size)) is not None:
        v.errors.append(error)


def _training(v: RunConfigValidation, section: dict[str, Any], vae: Any) -> LDMTrainingConfig | None:
    """The training section with the latent channels the autoencoder dictates; None: absent or refused."""
    if not v.present("ldm_model"):
        return None
    latent_channels = vae.model.z_channels if vae is not None else None
    completed = complete_ldm_training(section.get("training") or {}, latent_channels)
    ldm = v.core(LDMTrainingConfig, completed, "ldm_model.training")
    if ldm is not None:
        v.check_device(ldm.trainer.device, "ldm_model.training.trainer.device")
    return ldm


def _check_text_widths(v: RunConfigValidation, den_set: dict[str, Any], widths: tuple[int, int] | None) -> None:
    """Widths set on the denoiser must be the text encoder's."""
    if widths is None:
        return
    text = v.resolved["text"]
    if "context_dim" in den_set and den_set["context_dim"] != widths[0]:
        v.errors.append(
            f"ldm_model.training.denoiser.context_dim: {den_set['context_dim']}, but the text encoder "
            f"{text.name!r} (latent_store.text_encoder.name) produces {widths[0]}-dim tokens; leave it unset"
        )
    if "pooled_projection_dim" in den_set and den_set["pooled_projection_dim"] != widths[1]:
        v.errors.append(
            f"ldm_model.training.denoiser.pooled_projection_dim: {den_set['pooled_projection_dim']}, but "
            f"the text encoder {text.name!r} (latent_store.text_encoder.name) pools its captions to "
            f"{widths[1]}-dim vectors; leave it unset"
        )


def _init_from_errors(
    init_from: str | None, subfolder: str | None, latent_shape: tuple[int, int, int], widths: tuple[int, int]
) -> list[str]:
    """A local diffusers folder named by ldm_model.init_from, checked against the latents and the text encoder from
    its config alone (no weights read). Registered models, ``auto``/``none`` and remote folders are the asset's to
    check when it resolves them."""
    if not init_from or init_from in (NONE, AUTO) or init_from.startswith(REGISTERED_PREFIX):
        return []
    if not storage.is_local(init_from) or not Path(storage.local_path(init_from)).exists():
        return []
    try:
        config = backbone_config_of_folder(init_from, subfolder)
    except (FileNotFoundError, ValueError, TypeError) as e:
        return [f"ldm_model.init_from: {' '.join(str(e).split())}"]
    return [f"ldm_model.init_from: {problem}" for problem in shape_mismatches(config, latent_shape, *widths)]


def _denoiser_shape_errors(den: Any, resolution: int, factor: int) -> list[str]:
    """What stops the denoiser from running on latents of side resolution / factor, each with its field path."""
    latent, path, where = resolution // factor, "ldm_model.training.denoiser", f"{resolution} / {factor}"
    if isinstance(den, MMDiTConfig):
        p = den.patch_size
        if latent % p:
            return [
                (
                    f"{path}.patch_size: {p} does not divide the latent side {latent} (= {where}): the patches must "
                    "tile the latent"
                )
            ]
        if latent > p * den.pos_embed_max_size:
            return [
                (
                    f"{path}.pos_embed_max_size: {den.pos_embed_max_size} positions of {p}x{p} patches cover latents "
                    f"up to {p * den.pos_embed_max_size} per side, but the latent side is {latent} (= {where}); it "
                    f"needs at least {-(-latent // p)}"
                )
            ]
        return []
    levels = len(den.channel_mult)
    if latent % 2 ** (levels - 1):
        return [
            (
                f"{path}.channel_mult: {levels} levels downsample {levels - 1} times, but the latent resolution "
                f"{latent} (= {where}) is not divisible by {2 ** (levels - 1)}"
            )
        ]
    return []
