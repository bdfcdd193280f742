"""`vae_model`: the trained, frozen autoencoder (safetensors + config + latent scale), registered as `ldm-vae`."""

import dagster as dg

from ldm_core.bundle import save_autoencoder
from ldm_core.data import ImageShardDataset
from ldm_core.evaluation.fidelity import FidelityThresholds, autoencoder_fidelity
from ldm_core.model_io import read_model_meta
from ldm_core.tracking import FanoutTracker
from ldm_core.trainers.autoencoder import AutoencoderTrainingConfig, measure_latent_scale
from pipeline.asset_config import VaeModelConfig
from pipeline.assets.common import (
    GPU_OP_TAGS,
    GPU_POOL,
    GPU_RETRY_POLICY,
    GROUP,
    json_md,
    stable_key,
    upstream_metadata,
)
from pipeline.config_bridge import to_core
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
from pipeline.resources import ComputeResource, MLflowResource, StorageResource
from pipeline.tracking import DagsterProgress, temp_dir
from pipeline.validation import RunConfigCheck

REGISTERED_NAME = "ldm-vae"


def _previous(context: dg.AssetExecutionContext, mlflow: MLflowResource, materialization_key: str) -> dict | None:
    """The latest materialization's metadata when it came from this very dataset version and asset config, and its
    model is still in storage and in the registry; else None."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey("vae_model"))
    md = event.asset_materialization.metadata if event is not None and event.asset_materialization else {}
    if getattr(md.get("materialization_key"), "value", None) != materialization_key:
        return None
    try:
        read_model_meta(md["vae_url"].value)
        mlflow.client().get_model_version(REGISTERED_NAME, str(md["vae_version"].value))
    except Exception:
        return None
    return dict(md)


@dg.asset(group_name=GROUP, deps=["image_dataset"], pool=GPU_POOL, op_tags=GPU_OP_TAGS, retry_policy=GPU_RETRY_POLICY,
          kinds={"pytorch", "mlflow"}, description=__doc__)
def vae_model(context: dg.AssetExecutionContext, config: VaeModelConfig, mlflow: MLflowResource,
              storage: StorageResource, compute: ComputeResource,
              run_config_check: RunConfigCheck) -> dg.MaterializeResult:
    ds = upstream_metadata(context, "image_dataset")
    training = to_core(AutoencoderTrainingConfig, config.training, "vae_model.training")
    thresholds = to_core(FidelityThresholds, config.fidelity, "vae_model.fidelity")
    training = training.model_copy(update={"trainer": compute.apply(training.trainer)})
    train = ImageShardDataset(
        ds["dataset_url"], split="train", resolution=config.resolution, cache_decoded=config.cache_images
    )
    val = ImageShardDataset(ds["dataset_url"], split="validation", resolution=config.resolution)
    key = stable_key(ds["dataset_version"], training.to_dict(), config.resolution)
    ckpt_dir = storage.url("checkpoints", "vae", key)  # same data + config -> a killed run resumes here
    # Training is deterministic in (data, config): a rerun of the same job (after a kill further down the chain) gets
    # the registered autoencoder back instead of a new version of the same weights, so the latent store and the LDM
    # checkpoints keyed on that version carry on rather than starting over.
    materialization_key = stable_key(ds["dataset_version"], config.model_dump(), training.to_dict())
    if (previous := _previous(context, mlflow, materialization_key)) is not None:
        context.log.info(f"this dataset version and config already produced {previous['vae_uri'].value}; reusing it")
        return dg.MaterializeResult(metadata={**previous, "reused": True},
                                    data_version=dg.DataVersion(f"{REGISTERED_NAME}-v{previous['vae_version'].value}"))

    with mlflow.materialization_run(context) as run:
        progress = DagsterProgress(context.log, "vae", keys=PROGRESS_KEYS["vae"])
        spec = VaeTrainSpec(training=training.to_dict(), dataset_url=ds["dataset_url"], resolution=config.resolution,
                          cache_images=config.cache_images, checkpoint_dir=ckpt_dir,
                          output_url=storage.url("staging", "vae", f"{key}-{context.run.run_id[:8]}"),
                          mlflow_tracking_uri=mlflow.resolved_tracking_uri(), mlflow_run_id=run.run_id)
        # in this process, or on compute.num_processes processes under torchrun: the same result either way
        result, launch_md = launch.train(context, compute, spec, FanoutTracker(run.tracker, progress), data=train)
        model = result.model
        scale, shift = measure_latent_scale(model, train, max_items=config.latent_scale_samples,
                                            use_shift=config.use_shift, seed=training.trainer.seed)
        model.config.scaling_factor, model.config.shift_factor = scale, shift
        fidelity = autoencoder_fidelity(model, val if len(val) else train, max_items=config.psnr_images)
        psnr = fidelity.psnr
        run.tracker.log_metrics({"latent_scale": scale, "latent_shift": shift, "val_psnr": psnr,
                                 "val_worst_decile_psnr": fidelity.worst_decile_psnr,
                                 "val_max_channel_shift": fidelity.max_channel_shift,
                                 **{f"val_{c}_accuracy": v.accuracy for c, v in (fidelity.classes or {}).items()}},
                                step=result.step)
        model_url = storage.url("models", "vae", f"{key}-{context.run.run_id[:8]}")
        info = {"dataset_version": ds["dataset_version"], "mlflow_run_id": run.run_id, "steps": result.step}
        save_autoencoder(model_url, model, extra={"info": info})
        with temp_dir() as tmp:
            save_autoencoder(tmp, model)
            mv = run.log_and_register_pyfunc(
                name="vae", registered_name=REGISTERED_NAME, python_model=AUTOENCODER_CODE, artifacts={"vae": tmp},
                signature=autoencoder_signature(model.config.in_channels, config.resolution), alias="candidate",
                input_example=autoencoder_input_example(model.config.in_channels, config.resolution),
                code_paths=CODE_PATHS, pip_requirements=pinned_requirements(AUTOENCODER_PACKAGES),
                tags={"storage_url": model_url, "dataset_version": str(ds["dataset_version"])},
            )
        context.log.info(f"trained {result.step} steps; latent scale {scale:.5f}; val PSNR {psnr:.2f} dB; "
                         f"registered {REGISTERED_NAME} v{mv.version} (alias candidate)")
        c, h, w = model.config.latent_shape(config.resolution)
        return dg.MaterializeResult(
            metadata={
                "vae_url": model_url,
                "vae_uri": f"models:/{REGISTERED_NAME}/{mv.version}",
                "vae_version": int(mv.version),
                "latent_scale": scale,
                "latent_shift": shift,
                "latent_shape": [c, h, w],
                "resolution": config.resolution,
                "val_psnr": psnr,
                "psnr_floor": config.psnr_floor,
                "fidelity": json_md(fidelity.to_dict()),
                "fidelity_thresholds": json_md(thresholds.to_dict()),
                "steps": result.step,
                "resumed_from": result.resumed_from or 0,
                "perceptual_used": result.perceptual_used,
                "nonfinite_skipped": result.nonfinite_skipped,
                "images_per_second": result.images_per_second,
                "dataset_version": ds["dataset_version"],
                "mlflow_run_id": run.run_id,
                "mlflow_run": dg.MetadataValue.url(run.url),
                **launch_md,
                "materialization_key": materialization_key,
                "reused": False,
            },
            data_version=dg.DataVersion(f"{REGISTERED_NAME}-v{mv.version}"),
        )
