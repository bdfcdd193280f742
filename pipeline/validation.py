"""Validate a whole run config before any work starts: Dagster's schema (types, unknown keys) and ldm_core's
models (presets, cross-field checks), plus combinations across assets; every error names its field path."""

from __future__ import annotations

from typing import Any

import dagster as dg

from pipeline.config_bridge import ConfigValidationError, to_core


def _section(run_config: dict[str, Any], asset: str) -> dict[str, Any]:
    return ((run_config.get("ops") or {}).get(asset) or {}).get("config") or {}


def validate_run_config(run_config: dict[str, Any], job_name: str = "ldm_training_job") -> None:
    from ldm_core.data.latent_store import LatentStoreConfig
    from ldm_core.evaluation.evaluate import EvaluationConfig
    from ldm_core.trainers.autoencoder import AutoencoderTrainingConfig
    from ldm_core.trainers.ldm import LDMTrainingConfig
    from pipeline.definitions import defs

    job = defs.resolve_job_def(job_name)
    try:
        dg.validate_run_config(job, run_config)
    except dg.DagsterInvalidConfigError as e:
        raise ConfigValidationError("invalid run config:\n  " + "\n  ".join(err.message for err in e.errors)) from e

    ops = run_config.get("ops") or {}
    errors: list[str] = []

    def check(fn) -> Any:
        try:
            return fn()
        except ConfigValidationError as e:
            errors.extend(line.strip() for line in str(e).splitlines()[1:])
            return None

    vae_section = _section(run_config, "vae_model")
    vae = check(lambda: to_core(AutoencoderTrainingConfig, vae_section.get("training"), "vae_model.training")) if "vae_model" in ops else None
    if "latent_store" in ops:
        store = dict(_section(run_config, "latent_store").get("store") or {})
        store.setdefault("resolution", vae_section.get("resolution", 32))
        check(lambda: to_core(LatentStoreConfig, store, "latent_store.store"))
    ldm_section = _section(run_config, "ldm_model").get("training") or {}
    ldm = check(lambda: to_core(LDMTrainingConfig, _with_defaults(ldm_section, vae), "ldm_model.training")) if "ldm_model" in ops else None
    if "evaluation_report" in ops:
        check(lambda: to_core(EvaluationConfig, _section(run_config, "evaluation_report").get("evaluation"),
                              "evaluation_report.evaluation"))

    # combinations across assets
    resolution = vae_section.get("resolution", 32)
    if vae is not None and resolution % vae.model.downsample_factor:
        errors.append(f"vae_model.resolution: {resolution} is not divisible by the autoencoder's downsampling factor "
                      f"{vae.model.downsample_factor}")
    if vae is not None and ldm is not None and not resolution % vae.model.downsample_factor:
        latent = resolution // vae.model.downsample_factor
        levels = len(getattr(ldm.denoiser, "channel_mult", [1]))
        if latent % 2 ** (levels - 1):
            errors.append(f"ldm_model.training.denoiser.channel_mult: {levels} levels downsample {levels - 1} times, "
                          f"but the latent resolution {latent} (= {resolution} / {vae.model.downsample_factor}) is not "
                          f"divisible by {2 ** (levels - 1)}")
    if errors:
        raise ConfigValidationError("invalid run config:\n  " + "\n  ".join(errors))


def _with_defaults(section: dict[str, Any], vae: Any) -> dict[str, Any]:
    """The LDM section as the asset completes it (latent channels and text width come from upstream)."""
    data = dict(section)
    den = dict(data.get("denoiser") or {})
    if vae is not None:
        den.setdefault("in_channels", vae.model.z_channels)
        den.setdefault("out_channels", vae.model.z_channels)
    data["denoiser"] = den
    return data
