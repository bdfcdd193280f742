"""`vae_model`: the trained, frozen autoencoder (safetensors + config + latent scale), registered as `ldm-vae`.

Trained from scratch, or taken from a pretrained diffusers AutoencoderKL (`pretrained`): as it is (``frozen``) or
with its decoder fine-tuned (``decoder``). Either way the held-out reconstructions are measured for the blocking
checks and the result is registered as a version of `ldm-vae`."""

from dataclasses import dataclass
from typing import Any

import dagster as dg
from torch import nn

from ldm_core.bundle import save_autoencoder
from ldm_core.data import ImageShardDataset
from ldm_core.evaluation.fidelity import FidelityThresholds, autoencoder_fidelity
from ldm_core.interop.folders import PretrainedSourceNotFound
from ldm_core.interop.pretrained_vae import (
    PretrainedAutoencoder,
    PretrainedAutoencoderConfig,
    load_pretrained_autoencoder,
)
from ldm_core.model_io import read_model_meta, weights_sha256
from ldm_core.tracking import FanoutTracker
from ldm_core.trainers.autoencoder import AutoencoderTrainingConfig, measure_latent_scale
from pipeline.asset_common import GPU_ASSET, json_md, stable_key
from pipeline.config_bridge import to_core
from pipeline.defs.image_dataset.record import ImageDatasetRecord
from pipeline.defs.vae_model.config import VaeModelConfig
from pipeline.defs.vae_model.record import REGISTERED_NAME, VaeModelRecord
from pipeline.distributed import launch
from pipeline.distributed.entry import PROGRESS_KEYS
from pipeline.distributed.specs import VaeTrainSpec
from pipeline.mlflow_models import (
    AUTOENCODER_CODE,
    AUTOENCODER_PACKAGES,
    CODE_PATHS,
    autoencoder_input_example,
    autoencoder_signature,
    pinned_requirements,
)
from pipeline.resources import ComputeResource, MLflowResource, StorageResource, TrackedRun
from pipeline.tracking import DagsterProgress, temp_dir
from pipeline.upstream import Upstream, lineage_metadata, read_upstream
from pipeline.validation import RunConfigCheck


def _previous(context: dg.AssetExecutionContext, mlflow: MLflowResource, materialization_key: str) -> dict | None:
    """The latest materialization's metadata when it came from this very dataset version and asset config, and its
    model is still in storage and in the registry; else None."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey(VaeModelRecord.asset))
    md = dict(event.asset_materialization.metadata) if event is not None and event.asset_materialization else {}
    try:
        previous = VaeModelRecord.from_metadata(md)
    except ValueError:  # none, or one without a complete record
        return None
    if previous.materialization_key != materialization_key:
        return None
    try:
        read_model_meta(previous.vae_url)
        mlflow.client().get_model_version(REGISTERED_NAME, str(previous.vae_version))
    except Exception:
        return None
    return md


# ---------------------------------------------------------------------------------------------------------------
# A pretrained source
# ---------------------------------------------------------------------------------------------------------------


def _load_source(pretrained: PretrainedAutoencoderConfig) -> PretrainedAutoencoder:
    """The converted source, or a Failure of one line that a retry would not mend (a missing or unsuitable source);
    a storage fault is raised as it is, for the retry policy."""
    try:
        return load_pretrained_autoencoder(pretrained.source, pretrained.subfolder)
    except (PretrainedSourceNotFound, ValueError, ImportError) as e:
        raise dg.Failure(f"vae_model.pretrained: {e}", allow_retries=False) from None


def _init_url(storage: StorageResource, source: PretrainedAutoencoder) -> str:
    """The converted source saved under the storage root for the trainer (on every rank under torchrun), named by its
    content hash and so saved once."""
    url = storage.url("models", "vae-pretrained", source.weights_sha256[:16])
    try:
        if read_model_meta(url).get("weights_sha256") == source.weights_sha256:
            return url
    except FileNotFoundError:
        pass
    return save_autoencoder(url, source.model, extra={"source": source.source})


def _training_config(
    config: VaeModelConfig, compute: ComputeResource, source: PretrainedAutoencoder | None
) -> AutoencoderTrainingConfig:
    """The trainer's config: the run config's, with the compute settings, and for a pretrained source its architecture
    with only the decoder side trained."""
    training = to_core(AutoencoderTrainingConfig, config.training, "vae_model.training")
    trainer = compute.apply(training.trainer)
    if source is None:
        return training.model_copy(update={"trainer": trainer})
    return training.model_copy(
        update={"model": source.model.config, "trainer": trainer.model_copy(update={"trainable": "decoder"})}
    )


def _provenance(
    pretrained: PretrainedAutoencoderConfig | None, source: PretrainedAutoencoder | None, scale_source: str
) -> dict[str, str]:
    """Where the weights and the latent scale came from: registry tags, MLflow params and asset metadata alike."""
    out = {"latent_scale_source": scale_source}
    if pretrained is not None and source is not None:
        out.update(
            pretrained_source=source.source, pretrained_sha256=source.weights_sha256, pretrained_mode=pretrained.mode
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Phases of the asset
# ---------------------------------------------------------------------------------------------------------------


def _train(
    context: dg.AssetExecutionContext,
    compute: ComputeResource,
    run: TrackedRun,
    spec: VaeTrainSpec,
    train: ImageShardDataset,
) -> tuple[nn.Module, dict]:
    """Train (or resume), in this process or under torchrun: the model and the training's metadata."""
    progress = DagsterProgress(context.log, "vae", keys=PROGRESS_KEYS["vae"])
    # in this process, or on compute.num_processes processes under torchrun: the same result either way
    result, launch_md = launch.train(context, compute, spec, FanoutTracker(run.tracker, progress), data=train)
    return result.model, {
        "steps": result.step,
        "resumed_from": result.resumed_from or 0,
        "perceptual_used": result.perceptual_used,
        "nonfinite_skipped": result.nonfinite_skipped,
        "images_per_second": result.images_per_second,
        **launch_md,
    }


def _latent_scale(
    model: nn.Module,
    train: ImageShardDataset,
    config: VaeModelConfig,
    pretrained: PretrainedAutoencoderConfig | None,
    seed: int,
) -> tuple[float, float, str]:
    """(scale, shift, where they came from): a pretrained source's own config, or measured on the training images."""
    if pretrained is not None and pretrained.latent_scale == "config":
        return model.config.scaling_factor, model.config.shift_factor, "config"
    scale, shift = measure_latent_scale(
        model, train, max_items=config.latent_scale_samples, use_shift=config.use_shift, seed=seed
    )
    return scale, shift, "measured"


def _register(run: TrackedRun, model: nn.Module, resolution: int, tags: dict[str, str]):
    with temp_dir() as tmp:
        save_autoencoder(tmp, model)
        return run.log_and_register_pyfunc(
            name="vae",
            registered_name=REGISTERED_NAME,
            python_model=AUTOENCODER_CODE,
            artifacts={"vae": tmp},
            signature=autoencoder_signature(model.config.in_channels, resolution),
            alias="candidate",
            input_example=autoencoder_input_example(model.config.in_channels, resolution),
            code_paths=CODE_PATHS,
            pip_requirements=pinned_requirements(AUTOENCODER_PACKAGES),
            tags=tags,
        )


@dataclass(frozen=True)
class _Plan:
    """What the asset will do, decided from its config and the dataset before anything is trained."""

    pretrained: PretrainedAutoencoderConfig | None
    source: PretrainedAutoencoder | None
    training: AutoencoderTrainingConfig
    thresholds: FidelityThresholds
    key: str
    """Names the checkpoint directory: the same data + config resume there."""
    materialization_key: str
    """The same key reuses the previous materialization."""

    @property
    def frozen(self) -> bool:
        return self.pretrained is not None and self.pretrained.mode == "frozen"


def _plan(config: VaeModelConfig, compute: ComputeResource, ds: ImageDatasetRecord) -> _Plan:
    thresholds = to_core(FidelityThresholds, config.fidelity, "vae_model.fidelity")
    pretrained = (
        to_core(PretrainedAutoencoderConfig, config.pretrained, "vae_model.pretrained")
        if config.pretrained is not None
        else None
    )
    source = _load_source(pretrained) if pretrained is not None else None
    frozen = pretrained is not None and pretrained.mode == "frozen"
    training = _training_config(config, compute, source)
    # the source's weights are an input like the data: the same path holding other weights is other work
    origin = [source.weights_sha256] if source is not None else []
    key = stable_key(ds.dataset_version, training.to_dict(), config.resolution, *origin)
    # Training is deterministic in (data, config): a rerun of the same job (after a kill further down the chain) gets
    # the registered autoencoder back instead of a new version of the same weights, so the latent store and the LDM
    # checkpoints keyed on that version carry on rather than starting over. A frozen source trains nothing: its
    # trainer settings do not count.
    materialization_key = stable_key(
        ds.dataset_version, config.model_dump(), None if frozen else training.to_dict(), *origin
    )
    return _Plan(pretrained, source, training, thresholds, key, materialization_key)


def _trained_model(
    context: dg.AssetExecutionContext,
    config: VaeModelConfig,
    storage: StorageResource,
    compute: ComputeResource,
    mlflow: MLflowResource,
    run: TrackedRun,
    plan: _Plan,
    ds: ImageDatasetRecord,
    train: ImageShardDataset,
) -> tuple[nn.Module, dict]:
    """The autoencoder: a frozen source as it is, else trained (or resumed) from scratch or from the source."""
    if plan.frozen:
        return plan.source.model, {"steps": 0, "resumed_from": 0}
    spec = VaeTrainSpec(
        training=plan.training.to_dict(),
        dataset_url=ds.dataset_url,
        resolution=config.resolution,
        cache_images=config.cache_images,
        checkpoint_dir=storage.url("checkpoints", "vae", plan.key),
        output_url=storage.url("staging", "vae", f"{plan.key}-{context.run.run_id[:8]}"),
        init_url=_init_url(storage, plan.source) if plan.source is not None else None,
        mlflow_tracking_uri=mlflow.resolved_tracking_uri(),
        mlflow_run_id=run.run_id,
    )
    return _train(context, compute, run, spec, train)


def _log_measurements(run: TrackedRun, scale: float, shift: float, fidelity: Any, step: int) -> None:
    run.tracker.log_metrics(
        {
            "latent_scale": scale,
            "latent_shift": shift,
            "val_psnr": fidelity.psnr,
            "val_worst_decile_psnr": fidelity.worst_decile_psnr,
            "val_max_channel_shift": fidelity.max_channel_shift,
            **(
                {"val_worst_decile_foreground_shift": fidelity.worst_decile_foreground_shift}
                if fidelity.worst_decile_foreground_shift is not None
                else {}
            ),
            **{f"val_{c}_accuracy": v.accuracy for c, v in (fidelity.classes or {}).items()},
        },
        step=step,
    )


def _reused(context: dg.AssetExecutionContext, previous: dict, ds_read: Upstream) -> dg.MaterializeResult:
    record = VaeModelRecord.from_metadata(previous)
    context.log.info(f"this dataset version and config already produced {record.vae_uri}; reusing it")
    return dg.MaterializeResult(
        metadata={**previous, **lineage_metadata(ds_read), "reused": True},
        data_version=dg.DataVersion(f"{REGISTERED_NAME}-v{record.vae_version}"),
    )


@dg.asset(
    **GPU_ASSET,
    deps=["image_dataset"],
    kinds={"pytorch", "mlflow"},
    description=__doc__,
)
def vae_model(
    context: dg.AssetExecutionContext,
    config: VaeModelConfig,
    mlflow: MLflowResource,
    storage: StorageResource,
    compute: ComputeResource,
    run_config_check: RunConfigCheck,
) -> dg.MaterializeResult:
    ds_read = read_upstream(context, ImageDatasetRecord)
    ds = ds_read.record
    plan = _plan(config, compute, ds)
    train = ImageShardDataset(
        ds.dataset_url, split="train", resolution=config.resolution, cache_decoded=config.cache_images
    )
    val = ImageShardDataset(ds.dataset_url, split="validation", resolution=config.resolution)
    if (previous := _previous(context, mlflow, plan.materialization_key)) is not None:
        return _reused(context, previous, ds_read)

    with mlflow.materialization_run(context, system_metrics=True) as run:
        run.log_dataset(name=ds.asset, url=ds.dataset_url, digest=ds.dataset_version, context="training")
        model, trained_md = _trained_model(context, config, storage, compute, mlflow, run, plan, ds, train)
        scale, shift, scale_source = _latent_scale(model, train, config, plan.pretrained, plan.training.trainer.seed)
        model.config.scaling_factor, model.config.shift_factor = scale, shift
        provenance = _provenance(plan.pretrained, plan.source, scale_source)
        run.tracker.log_params(provenance)
        fidelity = autoencoder_fidelity(model, val if len(val) else train, max_items=config.psnr_images)
        _log_measurements(run, scale, shift, fidelity, trained_md["steps"])
        model_url = storage.url("models", "vae", f"{plan.key}-{context.run.run_id[:8]}")
        info = {"dataset_version": ds.dataset_version, "mlflow_run_id": run.run_id, "steps": trained_md["steps"]}
        save_autoencoder(model_url, model, extra={"info": {**info, **provenance}})
        sha256 = weights_sha256(model)
        tags = {"storage_url": model_url, "weights_sha256": sha256, "dataset_version": ds.dataset_version}
        mv = _register(run, model, config.resolution, {**tags, **provenance})
        source = plan.source
        how = (
            f"took {source.source} as it is"
            if plan.frozen
            else f"trained {trained_md['steps']} steps" + (f" of {source.source}'s decoder" if source else "")
        )
        context.log.info(
            f"{how}; latent scale {scale:.5f} ({scale_source}); val PSNR {fidelity.psnr:.2f} dB; "
            f"registered {REGISTERED_NAME} v{mv.version} (alias candidate)"
        )
        record = VaeModelRecord(
            vae_url=model_url,
            vae_uri=f"models:/{REGISTERED_NAME}/{mv.version}",
            vae_version=int(mv.version),
            latent_shape=model.config.latent_shape(config.resolution),
            resolution=config.resolution,
            mlflow_run_id=run.run_id,
            materialization_key=plan.materialization_key,
            val_psnr=fidelity.psnr,
            psnr_floor=config.psnr_floor,
            fidelity=json_md(fidelity.to_dict()).value,
            fidelity_thresholds=plan.thresholds.to_dict(),
        )
        return dg.MaterializeResult(
            metadata={
                **record.to_metadata(),
                "weights_sha256": sha256,
                "latent_scale": scale,
                "latent_shift": shift,
                **trained_md,
                **provenance,
                "dataset_version": ds.dataset_version,
                "mlflow_run": dg.MetadataValue.url(run.url),
                "reused": False,
                **lineage_metadata(ds_read),
            },
            data_version=dg.DataVersion(f"{REGISTERED_NAME}-v{mv.version}"),
        )
