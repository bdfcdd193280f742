"""Run-config validation of `vae_model` (see `pipeline.validation`)."""

from __future__ import annotations

from typing import Any

from ldm_core.interop.folders import PretrainedSourceNotFound
from ldm_core.interop.pretrained_vae import PretrainedAutoencoderConfig, pretrained_autoencoder_config
from ldm_core.trainers.autoencoder import AutoencoderTrainingConfig
from pipeline.defs.image_dataset.validation import batch_size_error
from pipeline.defs.vae_model.config import VaeModelConfig
from pipeline.validation import RunConfigValidation

CONFIG = VaeModelConfig


def validate(v: RunConfigValidation) -> None:
    """Its training (or pretrained) section; resolves ``vae`` (the autoencoder's training config, None when it is not
    known here) and ``resolution`` (the training images' side, the latent store's by default)."""
    section = v.section("vae_model")
    resolution = section.get("resolution", VaeModelConfig.model_fields["resolution"].default)
    v.resolved["resolution"] = resolution
    vae = (
        v.core(AutoencoderTrainingConfig, section.get("training"), "vae_model.training")
        if v.present("vae_model")
        else None
    )
    if vae is not None:
        v.check_device(vae.trainer.device, "vae_model.training.trainer.device")
    if vae is not None and section.get("pretrained") is not None:
        # the autoencoder the checks downstream see is the source's (None: not readable before the run)
        vae = _pretrained_autoencoder(v, section, vae)
    v.resolved["vae"] = vae
    if vae is None:
        return
    if resolution % vae.model.downsample_factor:
        v.errors.append(
            f"vae_model.resolution: {resolution} is not divisible by the autoencoder's downsampling factor "
            f"{vae.model.downsample_factor}"
        )
    if (error := batch_size_error(v, "vae_model", vae.trainer.batch_size)) is not None:
        v.errors.append(error)


def _pretrained_autoencoder(
    v: RunConfigValidation, section: dict[str, Any], training: AutoencoderTrainingConfig
) -> AutoencoderTrainingConfig | None:
    """The stage-1 config a pretrained source makes (its architecture, the decoder side trained), after refusing what
    contradicts it; None when the source cannot be read here (a remote one: the asset reads it) or is refused."""
    pretrained = v.core(PretrainedAutoencoderConfig, section["pretrained"], "vae_model.pretrained")
    if pretrained is None:
        return None
    set_training = {k: x for k, x in (section.get("training") or {}).items() if x is not None}
    if "model" in set_training:
        v.errors.append(
            "vae_model.training.model: the autoencoder comes from vae_model.pretrained.source; leave it unset"
        )
    trainable = (set_training.get("trainer") or {}).get("trainable")
    if pretrained.mode == "decoder" and trainable not in (None, "decoder"):
        v.errors.append(
            f"vae_model.training.trainer.trainable: {trainable!r}, but vae_model.pretrained.mode 'decoder' "
            "keeps the encoder fixed; leave it unset"
        )
    try:
        model = pretrained_autoencoder_config(pretrained.source, pretrained.subfolder)
    except (PretrainedSourceNotFound, ValueError) as e:
        v.errors.append(f"vae_model.pretrained.source: {e}")
        return None
    if model is None:
        return None
    data = training.to_dict()
    data["model"], data["trainer"]["trainable"] = model.to_dict(), "decoder"
    return v.core(AutoencoderTrainingConfig, data, "vae_model.training")
