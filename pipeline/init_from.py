"""`ldm_model.init_from`: which starting weights a run trains from, and why.

The setting is one of
  - ``none`` (or unset): from scratch, the seeded random initialisation;
  - ``auto``: the champion (``models:/ldm@champion``) when it is a valid warm start for this run, else from scratch.
    Valid means the same network as the run config's ``training.denoiser``, shapes that fit the latent store and its
    text encoder, and a champion trained on latents of the very autoencoder the store was encoded with (a retrained
    VAE makes a different latent space even when the shapes agree). The retrain sensor and the weekly schedule ask
    for this;
  - a registered model URI (``models:/ldm@champion``, ``models:/ldm/3``) or a diffusers UNet2DConditionModel /
    SD3Transformer2DModel folder (local or s3://): these weights, or the run fails in one line before training.
With weights, the network is theirs: ``training.denoiser`` may stay unset, or must describe the same network.

`plan_init` turns the setting into an `InitPlan` (the weights, if any, and the reason, one line); `stage_weights`
saves the weights where every training process can read them (`pipeline.distributed.specs.LdmTrainSpec`).
The conversion itself is ldm_core's (`ldm_core.init_weights`); the registry lookups are here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import dagster as dg
import mlflow
from mlflow.models import Model

from ldm_core import storage as ldm_storage
from ldm_core.bundle import save_denoiser
from ldm_core.init_weights import (
    InitWeights,
    architecture_differences,
    from_diffusers_folder,
    from_saved_denoiser,
    shape_mismatches,
)
from ldm_core.models.denoiser import DenoiserConfig, build_denoiser
from ldm_core.trainers.warm_start import load_init_weights
from pipeline.registry import ModelLookupError, resolve_model_uri, version_by_alias
from pipeline.tracking import temp_dir

NONE, AUTO = "none", "auto"
REGISTERED_PREFIX = "models:/"


@dataclass(frozen=True)
class StoreShapes:
    """What the latent store dictates: the data a warm start must fit."""

    latent_shape: tuple[int, int, int]
    context_dim: int
    pooled_dim: int | None
    vae_uri: str
    """The registered autoencoder the store was encoded with."""


@dataclass(frozen=True)
class InitPlan:
    setting: str
    """init_from as configured (none, auto, a URI or a folder)."""
    weights: InitWeights | None
    """The starting weights; None trains from scratch."""
    reason: str
    """Why these weights or none, in one line (metadata, MLflow params, the run log)."""
    source_vae_uri: str | None = None
    """A registered source's autoencoder (its tag), when it names one."""

    @property
    def warm_start(self) -> bool:
        return self.weights is not None

    def record(self) -> dict[str, Any]:
        """What the run says about its start: asset metadata, MLflow params, the bundle's info."""
        return {
            "init_from": self.weights.source if self.weights else NONE,
            "init_setting": self.setting,
            "init_source_hash": self.weights.sha256 if self.weights else "",
            "warm_start": self.warm_start,
            "warm_start_reason": self.reason,
        }


def _fail(message: str) -> dg.Failure:
    # a setting that names nothing usable fails the same way on every retry
    return dg.Failure(message, allow_retries=False)


def registered_weights(client: Any, uri: str) -> tuple[InitWeights, str | None]:
    """The denoiser weights of a registered text-to-image model, and the autoencoder it was trained on (its
    ``vae_uri`` tag). A URI that names nothing is a ModelLookupError (one line)."""
    mv = resolve_model_uri(client, uri)
    exact = f"models:/{mv.name}/{mv.version}"
    with temp_dir() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=exact, dst_path=tmp)
        bundle = Model.load(local).flavors["python_function"]["artifacts"]["bundle"]["path"]
        weights = from_saved_denoiser(ldm_storage.join(os.path.join(local, bundle), "denoiser"), source=exact)
    return weights, mv.tags.get("vae_uri")


def _explicit(setting: str, subfolder: str | None, client: Any) -> tuple[InitWeights, str | None]:
    try:
        if setting.startswith(REGISTERED_PREFIX):
            return registered_weights(client, setting)
        return from_diffusers_folder(setting, subfolder), None
    except (ModelLookupError, FileNotFoundError, ValueError, TypeError) as e:
        raise _fail(f"ldm_model.init_from: {' '.join(str(e).split())}") from None


def _champion(registered_name: str, configured: DenoiserConfig, store: StoreShapes, client: Any) -> InitPlan:
    champion = version_by_alias(client, registered_name, "champion")  # a registry error raises: retried, not "none"
    if champion is None:
        return InitPlan(AUTO, None, f"from scratch: no {registered_name}@champion yet")
    uri = f"models:/{registered_name}/{champion.version}"
    vae_uri = champion.tags.get("vae_uri")
    if vae_uri != store.vae_uri:  # checked first: it needs no download
        return InitPlan(
            AUTO,
            None,
            f"from scratch: the champion {uri} was trained on latents of {vae_uri}; the "
            f"latent store was encoded with {store.vae_uri}",
            vae_uri,
        )
    weights, _ = registered_weights(client, uri)
    if diffs := architecture_differences(weights.config, configured):
        return InitPlan(
            AUTO,
            None,
            f"from scratch: the champion {uri}'s network differs from ldm_model.training.denoiser ({', '.join(diffs)})",
            vae_uri,
        )
    if problems := shape_mismatches(
        weights.config, store.latent_shape, store.context_dim, store.pooled_dim, source=f"the champion {uri}"
    ):
        return InitPlan(AUTO, None, "from scratch: " + "; ".join(problems), vae_uri)
    return InitPlan(
        AUTO, weights, f"warm start from the champion {uri} (same network, same autoencoder {vae_uri})", vae_uri
    )


def plan_init(
    setting: str | None,
    subfolder: str | None,
    *,
    configured: DenoiserConfig,
    denoiser_set: bool,
    store: StoreShapes,
    client: Any,
    registered_name: str,
) -> InitPlan:
    """The starting weights a run trains from (see the module docstring).

    configured: the run config's denoiser (completed with the store's shapes); denoiser_set: whether the run config
    sets ``training.denoiser`` (an explicit source's network must then be the same). A source that does not fit is a
    dg.Failure without retries, one line naming both sides; ``auto`` falls back to from scratch and says why."""
    setting = (setting or NONE).strip()
    if setting == NONE:
        return InitPlan(NONE, None, "from scratch: init_from is none")
    if setting == AUTO:
        return _champion(registered_name, configured, store, client)
    weights, vae_uri = _explicit(setting, subfolder, client)
    problems = shape_mismatches(weights.config, store.latent_shape, store.context_dim, store.pooled_dim)
    if denoiser_set and (diffs := architecture_differences(weights.config, configured)):
        problems.append(
            f"init_from's network differs from ldm_model.training.denoiser ({', '.join(diffs)}): leave "
            "training.denoiser unset to train the source's network"
        )
    if problems:
        raise _fail("; ".join(problems))
    reason = f"warm start from {weights.source}"
    if vae_uri is not None and vae_uri != store.vae_uri:
        reason += (
            f" (trained on latents of {vae_uri}; the latent store was encoded with {store.vae_uri}: a "
            "different autoencoder, kept because init_from names this model)"
        )
    return InitPlan(setting, weights, reason, vae_uri)


def stage_weights(plan: InitPlan, url_for: Any) -> str | None:
    """Save a plan's weights where every training process reads them, at ``url_for(hash prefix)``: named by content,
    so two runs from the same source write the same files; None without weights."""
    if plan.weights is None:
        return None
    url = url_for(plan.weights.sha256[:16])
    model = build_denoiser(plan.weights.config)
    load_init_weights(model, plan.weights.state_dict, "denoiser")
    save_denoiser(url, model)
    return url


__all__ = ["AUTO", "NONE", "InitPlan", "StoreShapes", "plan_init", "registered_weights", "stage_weights"]
