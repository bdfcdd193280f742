"""Validate a whole run config before any work starts: Dagster's schema (types, unknown keys) and ldm_core's
models (presets, cross-field checks), plus the bounds of the asset configs and combinations across assets; every
error names its field path.

- `validate_run_config(run_config, job)`: everything, for `ldm demo` / `ldm validate` before a launch;
- `check_sections(run_config)`: what Dagster's typed schema cannot see (ldm_core's models, bounds, combinations);
- `RunConfigCheck`: the resource every asset takes, which runs `check_sections` when a run's resources are
  initialized, i.e. before the first asset of a run launched any other way (UI, `dagster job execute`, schedule,
  sensor) does any work. A deployment swaps or drops it like any other resource.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import dagster as dg
import torch
from transformers import AutoConfig

from ldm_core import storage
from ldm_core.data.ingest import IngestConfig
from ldm_core.data.latent_store.schema import LatentStoreConfig
from ldm_core.evaluation.evaluate import EvaluationConfig
from ldm_core.init_weights import shape_mismatches
from ldm_core.interop.backbone_folder import backbone_config_of_folder
from ldm_core.interop.folders import PretrainedSourceNotFound
from ldm_core.interop.pretrained_vae import PretrainedAutoencoderConfig, pretrained_autoencoder_config
from ldm_core.models.mmdit import MMDiTConfig
from ldm_core.text_encoder import TextEncoderConfig, resolve_model_path, widths_from_config
from ldm_core.trainers.autoencoder import AutoencoderTrainingConfig
from ldm_core.trainers.config import Precision
from ldm_core.trainers.ldm import LDMTrainingConfig
from pipeline.asset_config import (
    ASSET_CONFIGS,
    BUILTIN_SHAPES,
    ImageDatasetConfig,
    VaeModelConfig,
    complete_ldm_training,
)
from pipeline.config_bridge import ConfigValidationError, to_core
from pipeline.init_from import AUTO, NONE, REGISTERED_PREFIX

PRECISIONS = get_args(Precision)


class RunConfigCheck(dg.ConfigurableResource):
    """Refuses a run whose config ldm_core would refuse (presets, bounds, combinations across assets), when the run's
    resources are initialized: before its first asset does any work. Dagster's typed config has already refused
    wrong types and unknown keys by then."""

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        run = context.dagster_run
        if run is not None and run.run_config:
            check_sections(run.run_config)


def _section(run_config: dict[str, Any], asset: str) -> dict[str, Any]:
    return ((run_config.get("ops") or {}).get(asset) or {}).get("config") or {}


def validate_run_config(run_config: dict[str, Any], job: dg.JobDefinition) -> None:
    """Validate ``run_config`` for ``job`` (Dagster's schema, then `check_sections`)."""
    try:
        dg.validate_run_config(job, run_config)
    except dg.DagsterInvalidConfigError as e:
        raise ConfigValidationError("invalid run config:\n  " + "\n  ".join(err.message for err in e.errors)) from e
    check_sections(run_config)


def check_sections(run_config: dict[str, Any]) -> None:
    """Validate every asset section present in ``run_config`` with ldm_core's models, bounds and cross-asset
    combinations; raise `ConfigValidationError` listing every problem with its field path."""
    ops = run_config.get("ops") or {}
    errors: list[str] = []

    def check(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except ConfigValidationError as e:
            errors.extend(line.strip() for line in str(e).splitlines()[1:])
            return None

    # the asset configs' own fields (their bounds are declared on the fields)
    for asset, config_class in ASSET_CONFIGS.items():
        if asset in ops:
            check(to_core, config_class, _section(run_config, asset), asset)

    # ---- image_dataset ------------------------------------------------------------------------------------------
    ds_section = _section(run_config, "image_dataset")
    if "image_dataset" in ops:
        source = ds_section.get("source") or BUILTIN_SHAPES
        check(to_core, IngestConfig, {**(ds_section.get("ingest") or {}), "source": source}, "image_dataset.ingest")

    # ---- vae_model ----------------------------------------------------------------------------------------------
    vae_section = _section(run_config, "vae_model")
    vae = None
    if "vae_model" in ops:
        vae = check(to_core, AutoencoderTrainingConfig, vae_section.get("training"), "vae_model.training")
    if vae is not None:
        _check_device(vae.trainer.device, "vae_model.training.trainer.device", errors)
    if vae is not None and vae_section.get("pretrained") is not None:
        # the autoencoder the checks below see is the source's (None: not readable before the run, checks skipped)
        vae = _pretrained_autoencoder(vae_section, vae, errors, check)

    # ---- latent_store -------------------------------------------------------------------------------------------
    resolution = vae_section.get("resolution", VaeModelConfig.model_fields["resolution"].default)
    store_section = _section(run_config, "latent_store")
    text = store_cfg = None
    if "latent_store" in ops:
        store = dict(store_section.get("store") or {})
        store.setdefault("resolution", resolution)
        store_cfg = check(to_core, LatentStoreConfig, store, "latent_store.store")
        text = check(to_core, TextEncoderConfig, store_section.get("text_encoder"), "latent_store.text_encoder")
        if store_cfg is not None and vae is not None and store_cfg.resolution % vae.model.downsample_factor:
            errors.append(
                f"latent_store.store.resolution: {store_cfg.resolution} is not divisible by the "
                f"autoencoder's downsampling factor {vae.model.downsample_factor}"
            )

    # ---- ldm_model ----------------------------------------------------------------------------------------------
    ldm_section = _section(run_config, "ldm_model").get("training") or {}
    latent_channels = vae.model.z_channels if vae is not None else None
    ldm = None
    if "ldm_model" in ops:
        completed = complete_ldm_training(ldm_section, latent_channels)
        ldm = check(to_core, LDMTrainingConfig, completed, "ldm_model.training")
    if ldm is not None:
        _check_device(ldm.trainer.device, "ldm_model.training.trainer.device", errors)

    # ---- evaluation_report --------------------------------------------------------------------------------------
    if "evaluation_report" in ops:
        check(
            to_core,
            EvaluationConfig,
            _section(run_config, "evaluation_report").get("evaluation"),
            "evaluation_report.evaluation",
        )

    # ---- combinations across assets -----------------------------------------------------------------------------
    if vae is not None and resolution % vae.model.downsample_factor:
        errors.append(
            f"vae_model.resolution: {resolution} is not divisible by the autoencoder's downsampling factor "
            f"{vae.model.downsample_factor}"
        )
    # the denoiser's shapes against the latents the store will hold (encoded at the store's resolution)
    latent_resolution = store_cfg.resolution if store_cfg is not None else resolution
    if vae is not None and ldm is not None and not latent_resolution % vae.model.downsample_factor:
        errors.extend(_denoiser_shape_errors(ldm.denoiser, latent_resolution, vae.model.downsample_factor))
    den_set = {k: v for k, v in (ldm_section.get("denoiser") or {}).items() if v is not None}
    if vae is not None and ldm is not None:
        for name in ("in_channels", "out_channels"):
            if name in den_set and den_set[name] != vae.model.z_channels:
                errors.append(
                    f"ldm_model.training.denoiser.{name}: {den_set[name]}, but the autoencoder's "
                    f"latents have {vae.model.z_channels} channels (vae_model.training.model.z_channels); "
                    "leave it unset"
                )
    widths = _text_widths(text) if "latent_store" in ops and text is not None else None
    if "context_dim" in den_set and widths is not None and den_set["context_dim"] != widths[0]:
        errors.append(
            f"ldm_model.training.denoiser.context_dim: {den_set['context_dim']}, but the text encoder "
            f"{text.name!r} (latent_store.text_encoder.name) produces {widths[0]}-dim tokens; leave it unset"
        )
    if "pooled_projection_dim" in den_set and widths is not None and den_set["pooled_projection_dim"] != widths[1]:
        errors.append(
            f"ldm_model.training.denoiser.pooled_projection_dim: {den_set['pooled_projection_dim']}, but "
            f"the text encoder {text.name!r} (latent_store.text_encoder.name) pools its captions to "
            f"{widths[1]}-dim vectors; leave it unset"
        )
    init_section = _section(run_config, "ldm_model")
    if vae is not None and widths is not None and not latent_resolution % vae.model.downsample_factor:
        side = latent_resolution // vae.model.downsample_factor
        errors.extend(
            _init_from_errors(
                init_section.get("init_from"),
                init_section.get("init_subfolder"),
                (vae.model.z_channels, side, side),
                widths,
            )
        )
    if ldm is not None and store_cfg is not None and ldm.trainer.sample_posterior and store_cfg.content != "moments":
        errors.append(
            f"ldm_model.training.trainer.sample_posterior: draws from the stored posterior, but "
            f"latent_store.store.content is {store_cfg.content!r} (one fixed sample per image); set it to "
            "'moments'"
        )
    if ds_section.get("source", BUILTIN_SHAPES) == BUILTIN_SHAPES and "image_dataset" in ops:
        count = ds_section.get("builtin_count", ImageDatasetConfig.model_fields["builtin_count"].default)
        for asset, cfg in (("vae_model", vae), ("ldm_model", ldm)):
            if cfg is not None and isinstance(count, int) and count < cfg.trainer.batch_size:
                errors.append(
                    f"{asset}.training.trainer.batch_size: {cfg.trainer.batch_size} is more than the "
                    f"{count} images image_dataset.builtin_count generates (every step needs a full batch)"
                )

    # ---- resources ----------------------------------------------------------------------------------------------
    compute = ((run_config.get("resources") or {}).get("compute") or {}).get("config") or {}
    if compute.get("device") is not None:
        _check_device(compute["device"], "resources.compute.device", errors)
    if compute.get("precision") is not None and compute["precision"] not in PRECISIONS:
        errors.append(f"resources.compute.precision: {compute['precision']!r} is not one of {list(PRECISIONS)}")
    for name in ("num_processes", "threads"):  # num_processes may also be "auto"
        value = compute.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 1:
            errors.append(f"resources.compute.{name}: {value} must be >= 1")

    if errors:
        raise ConfigValidationError("invalid run config:\n  " + "\n  ".join(errors))


def _pretrained_autoencoder(
    section: dict[str, Any], training: AutoencoderTrainingConfig, errors: list[str], check: Any
) -> AutoencoderTrainingConfig | None:
    """The stage-1 config a pretrained source makes (its architecture, the decoder side trained), after refusing what
    contradicts it; None when the source cannot be read here (a remote one: the asset reads it) or is refused."""
    pretrained = check(to_core, PretrainedAutoencoderConfig, section["pretrained"], "vae_model.pretrained")
    if pretrained is None:
        return None
    set_training = {k: v for k, v in (section.get("training") or {}).items() if v is not None}
    if "model" in set_training:
        errors.append(
            "vae_model.training.model: the autoencoder comes from vae_model.pretrained.source; leave it unset"
        )
    trainable = (set_training.get("trainer") or {}).get("trainable")
    if pretrained.mode == "decoder" and trainable not in (None, "decoder"):
        errors.append(
            f"vae_model.training.trainer.trainable: {trainable!r}, but vae_model.pretrained.mode 'decoder' "
            "keeps the encoder fixed; leave it unset"
        )
    try:
        model = pretrained_autoencoder_config(pretrained.source, pretrained.subfolder)
    except (PretrainedSourceNotFound, ValueError) as e:
        errors.append(f"vae_model.pretrained.source: {e}")
        return None
    if model is None:
        return None
    data = training.to_dict()
    data["model"], data["trainer"]["trainable"] = model.to_dict(), "decoder"
    return check(to_core, AutoencoderTrainingConfig, data, "vae_model.training")


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


def _check_device(spec: str, path: str, errors: list[str]) -> None:
    """The device must be one torch can name ("auto", "cpu", "cuda", "cuda:1", …); whether it exists is the
    machine's business, not the config's (a run is often configured on a laptop and run on a GPU node)."""
    if spec == "auto":
        return
    try:
        torch.device(spec)
    except (RuntimeError, ValueError) as e:
        errors.append(f"{path}: {spec!r} is not a torch device ({str(e).splitlines()[0]})")


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


def _text_widths(text: Any) -> tuple[int, int] | None:
    """(token width, pooled width) of a text encoder from its config alone (no weights loaded); None when it cannot
    be read."""
    try:
        return widths_from_config(AutoConfig.from_pretrained(resolve_model_path(text.name)))
    except Exception:  # not available here (a hub id offline): the asset checks it when it loads the encoder
        return None
