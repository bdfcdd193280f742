"""Validate a whole run config before any work starts: Dagster's schema (types, unknown keys) and ldm_core's
models (presets, cross-field checks), plus bounds and combinations across assets; every error names its field path.

Two entry points:

- `validate_run_config(run_config, job_name)`: everything, for `ldm demo` / `ldm validate` before a launch;
- `check_sections(run_config)`: what Dagster's typed schema cannot see (ldm_core's models, bounds, combinations).
  `StorageResource.setup_for_execution` calls it when a run's resources are initialized, i.e. before the first
  asset of a run launched any other way (UI, `dagster job execute`, schedule, sensor) does any work.
"""

from __future__ import annotations

from typing import Any, Callable

import dagster as dg

from pipeline.config_bridge import ConfigValidationError, to_core

MIN_SHAPE_SIZE = 16  # write_shapes_source refuses smaller images (the shapes could not be told apart)

# Bounds of plain fields: the trainer configs (ldm_core's TrainerConfig and its stages) bound their own fields, so
# their errors arrive through `to_core` with the field path.
_POSITIVE = (lambda v: v > 0, "must be > 0")
_AT_LEAST_1 = (lambda v: v >= 1, "must be >= 1")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
# Asset-level fields of the Dagster config classes (plain fields, not ldm_core models): section -> field -> bound.
_ASSET_BOUNDS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "image_dataset": {"builtin_count": _AT_LEAST_1, "photo_crops": _NON_NEGATIVE,
                      "builtin_size": (lambda v: v >= MIN_SHAPE_SIZE, f"must be >= {MIN_SHAPE_SIZE}"),
                      "photo_size": (lambda v: v >= MIN_SHAPE_SIZE, f"must be >= {MIN_SHAPE_SIZE}"),
                      "check_max_bad_fraction": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")},
    "vae_model": {"resolution": _AT_LEAST_1, "latent_scale_samples": _AT_LEAST_1, "psnr_images": _AT_LEAST_1},
    "latent_store": {"check_sample_rows": _AT_LEAST_1, "check_std_tolerance": _POSITIVE},
    "ldm_model": {"validation_seeds": _AT_LEAST_1, "guidance": _NON_NEGATIVE},
    "evaluation_report": {"held_out_images": _AT_LEAST_1, "photo_images": _NON_NEGATIVE, "steps": _AT_LEAST_1,
                          "guidance": _NON_NEGATIVE},
}
_TEXT_ENCODER_BOUNDS = {"max_length": _AT_LEAST_1, "batch_size": _AT_LEAST_1}
_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _section(run_config: dict[str, Any], asset: str) -> dict[str, Any]:
    return ((run_config.get("ops") or {}).get(asset) or {}).get("config") or {}


def validate_run_config(run_config: dict[str, Any], job_name: str = "ldm_training_job") -> None:
    from pipeline.definitions import defs

    job = defs.resolve_job_def(job_name)
    try:
        dg.validate_run_config(job, run_config)
    except dg.DagsterInvalidConfigError as e:
        raise ConfigValidationError("invalid run config:\n  " + "\n  ".join(err.message for err in e.errors)) from e
    check_sections(run_config)


def check_sections(run_config: dict[str, Any]) -> None:
    """Validate every asset section present in ``run_config`` with ldm_core's models, bounds and cross-asset
    combinations; raise `ConfigValidationError` listing every problem with its field path."""
    from ldm_core.data.ingest import IngestConfig
    from ldm_core.data.latent_store import LatentStoreConfig
    from ldm_core.evaluation.evaluate import EvaluationConfig
    from ldm_core.text_encoder import TextEncoderConfig
    from ldm_core.trainers.autoencoder import AutoencoderTrainingConfig
    from ldm_core.trainers.ldm import LDMTrainingConfig
    from pipeline.assets.image_dataset import BUILTIN_SHAPES, ImageDatasetConfig
    from pipeline.assets.vae_model import VaeModelConfig

    ops = run_config.get("ops") or {}
    errors: list[str] = []

    def check(fn) -> Any:
        try:
            return fn()
        except ConfigValidationError as e:
            errors.extend(line.strip() for line in str(e).splitlines()[1:])
            return None

    def bounds(values: Any, table: dict[str, tuple[Callable[[Any], bool], str]], path: str) -> None:
        get = values.get if isinstance(values, dict) else lambda k: getattr(values, k, None)
        for name, (ok, text) in table.items():
            v = get(name)
            if v is not None and isinstance(v, (int, float)) and not ok(v):
                errors.append(f"{path}.{name}: {v} {text}")

    for asset, table in _ASSET_BOUNDS.items():
        if asset in ops:
            bounds(_section(run_config, asset), table, asset)

    # ---- image_dataset ------------------------------------------------------------------------------------------
    ds_section = _section(run_config, "image_dataset")
    if "image_dataset" in ops:
        source = ds_section.get("source") or BUILTIN_SHAPES
        check(lambda: to_core(IngestConfig, {**(ds_section.get("ingest") or {}), "source": source}, "image_dataset.ingest"))

    # ---- vae_model ----------------------------------------------------------------------------------------------
    vae_section = _section(run_config, "vae_model")
    vae = check(lambda: to_core(AutoencoderTrainingConfig, vae_section.get("training"), "vae_model.training")) if "vae_model" in ops else None
    if vae is not None:
        _check_device(vae.trainer.device, "vae_model.training.trainer.device", errors)

    # ---- latent_store -------------------------------------------------------------------------------------------
    resolution = vae_section.get("resolution", VaeModelConfig.model_fields["resolution"].default)
    store_section = _section(run_config, "latent_store")
    text = store_cfg = None
    if "latent_store" in ops:
        store = dict(store_section.get("store") or {})
        store.setdefault("resolution", resolution)
        store_cfg = check(lambda: to_core(LatentStoreConfig, store, "latent_store.store"))
        text = check(lambda: to_core(TextEncoderConfig, store_section.get("text_encoder"), "latent_store.text_encoder"))
        if text is not None:
            bounds(text, _TEXT_ENCODER_BOUNDS, "latent_store.text_encoder")
        if store_cfg is not None and vae is not None and store_cfg.resolution % vae.model.downsample_factor:
            errors.append(f"latent_store.store.resolution: {store_cfg.resolution} is not divisible by the autoencoder's "
                          f"downsampling factor {vae.model.downsample_factor}")

    # ---- ldm_model ----------------------------------------------------------------------------------------------
    ldm_section = _section(run_config, "ldm_model").get("training") or {}
    ldm = check(lambda: to_core(LDMTrainingConfig, _with_defaults(ldm_section, vae), "ldm_model.training")) if "ldm_model" in ops else None
    if ldm is not None:
        _check_device(ldm.trainer.device, "ldm_model.training.trainer.device", errors)

    # ---- evaluation_report --------------------------------------------------------------------------------------
    if "evaluation_report" in ops:
        check(lambda: to_core(EvaluationConfig, _section(run_config, "evaluation_report").get("evaluation"),
                              "evaluation_report.evaluation"))

    # ---- combinations across assets -----------------------------------------------------------------------------
    if vae is not None and resolution % vae.model.downsample_factor:
        errors.append(f"vae_model.resolution: {resolution} is not divisible by the autoencoder's downsampling factor "
                      f"{vae.model.downsample_factor}")
    # the denoiser's shapes against the latents the store will hold (encoded at the store's resolution)
    latent_resolution = store_cfg.resolution if store_cfg is not None else resolution
    if vae is not None and ldm is not None and not latent_resolution % vae.model.downsample_factor:
        errors.extend(_denoiser_shape_errors(ldm.denoiser, latent_resolution, vae.model.downsample_factor))
    den_set = {k: v for k, v in (ldm_section.get("denoiser") or {}).items() if v is not None}
    if vae is not None and ldm is not None:
        for name in ("in_channels", "out_channels"):
            if name in den_set and den_set[name] != vae.model.z_channels:
                errors.append(f"ldm_model.training.denoiser.{name}: {den_set[name]}, but the autoencoder's latents have "
                              f"{vae.model.z_channels} channels (vae_model.training.model.z_channels); leave it unset")
    widths = _text_widths(text) if "latent_store" in ops and text is not None else None
    if "context_dim" in den_set and widths is not None and den_set["context_dim"] != widths[0]:
        errors.append(f"ldm_model.training.denoiser.context_dim: {den_set['context_dim']}, but the text encoder "
                      f"{text.name!r} (latent_store.text_encoder.name) produces {widths[0]}-dim tokens; leave it unset")
    if "pooled_projection_dim" in den_set and widths is not None and den_set["pooled_projection_dim"] != widths[1]:
        errors.append(f"ldm_model.training.denoiser.pooled_projection_dim: {den_set['pooled_projection_dim']}, but "
                      f"the text encoder {text.name!r} (latent_store.text_encoder.name) pools its captions to "
                      f"{widths[1]}-dim vectors; leave it unset")
    if ldm is not None and store_cfg is not None and ldm.trainer.sample_posterior and store_cfg.content != "moments":
        errors.append(f"ldm_model.training.trainer.sample_posterior: draws from the stored posterior, but "
                      f"latent_store.store.content is {store_cfg.content!r} (one fixed sample per image); set it to "
                      "'moments'")
    if ds_section.get("source", BUILTIN_SHAPES) == BUILTIN_SHAPES and "image_dataset" in ops:
        count = ds_section.get("builtin_count", ImageDatasetConfig.model_fields["builtin_count"].default)
        for asset, cfg in (("vae_model", vae), ("ldm_model", ldm)):
            if cfg is not None and isinstance(count, int) and count < cfg.trainer.batch_size:
                errors.append(f"{asset}.training.trainer.batch_size: {cfg.trainer.batch_size} is more than the "
                              f"{count} images image_dataset.builtin_count generates (every step needs a full batch)")

    # ---- resources ----------------------------------------------------------------------------------------------
    compute = ((run_config.get("resources") or {}).get("compute") or {}).get("config") or {}
    if compute.get("device") is not None:
        _check_device(compute["device"], "resources.compute.device", errors)
    if compute.get("precision") is not None and compute["precision"] not in _PRECISIONS:
        errors.append(f"resources.compute.precision: {compute['precision']!r} is not one of {list(_PRECISIONS)}")
    bounds(compute, {"num_processes": _AT_LEAST_1, "threads": _AT_LEAST_1}, "resources.compute")

    if errors:
        raise ConfigValidationError("invalid run config:\n  " + "\n  ".join(errors))


def _check_device(spec: str, path: str, errors: list[str]) -> None:
    """The device must be one torch can name ("auto", "cpu", "cuda", "cuda:1", …); whether it exists is the
    machine's business, not the config's (a run is often configured on a laptop and run on a GPU node)."""
    if spec == "auto":
        return
    import torch

    try:
        torch.device(spec)
    except (RuntimeError, ValueError) as e:
        errors.append(f"{path}: {spec!r} is not a torch device ({str(e).splitlines()[0]})")


def _denoiser_shape_errors(den: Any, resolution: int, factor: int) -> list[str]:
    """What stops the denoiser from running on latents of side resolution / factor, each with its field path."""
    from ldm_core.models.mmdit import MMDiTConfig

    latent, path, where = resolution // factor, "ldm_model.training.denoiser", f"{resolution} / {factor}"
    if isinstance(den, MMDiTConfig):
        p = den.patch_size
        if latent % p:
            return [(f"{path}.patch_size: {p} does not divide the latent side {latent} (= {where}): the patches must "
                     "tile the latent")]
        if latent > p * den.pos_embed_max_size:
            return [(f"{path}.pos_embed_max_size: {den.pos_embed_max_size} positions of {p}x{p} patches cover latents "
                     f"up to {p * den.pos_embed_max_size} per side, but the latent side is {latent} (= {where}); it "
                     f"needs at least {-(-latent // p)}")]
        return []
    levels = len(den.channel_mult)
    if latent % 2 ** (levels - 1):
        return [(f"{path}.channel_mult: {levels} levels downsample {levels - 1} times, but the latent resolution "
                 f"{latent} (= {where}) is not divisible by {2 ** (levels - 1)}")]
    return []


def _text_widths(text: Any) -> tuple[int, int] | None:
    """(token width, pooled width) of a text encoder from its config alone (no weights loaded); None when it cannot
    be read."""
    try:
        from transformers import AutoConfig

        from ldm_core.text_encoder import resolve_model_path, widths_from_config

        return widths_from_config(AutoConfig.from_pretrained(resolve_model_path(text.name)))
    except Exception:  # not available here (a hub id offline): the asset checks it when it loads the encoder
        return None


def _with_defaults(section: dict[str, Any], vae: Any) -> dict[str, Any]:
    """The LDM section as the asset completes it (latent channels and text width come from upstream)."""
    data = dict(section)
    den = dict(data.get("denoiser") or {})
    if vae is not None:
        den.setdefault("in_channels", vae.model.z_channels)
        den.setdefault("out_channels", vae.model.z_channels)
    data["denoiser"] = den
    return data
