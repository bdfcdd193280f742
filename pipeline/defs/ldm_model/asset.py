"""`ldm_model`: the text-conditioned denoiser (EMA) trained on the latent store, registered as `ldm` (a pyfunc).

The backbone is the run config's ``denoiser.kind``: the UNet (default) or the MMDiT (``{kind: mmdit, preset: …}``)."""

from typing import Any

import dagster as dg

from ldm_core.bundle import load_autoencoder, save_text_to_image
from ldm_core.data.latent_store.reader import LatentStore
from ldm_core.models.denoiser import backbone_summary, describe_backbone, takes_pooled
from ldm_core.text_encoder import TextEncoder, TextEncoderConfig
from ldm_core.tracking import FanoutTracker
from ldm_core.trainers.ldm import LDMTrainingConfig
from pipeline.asset_common import GPU_ASSET, json_md, stable_key
from pipeline.config_bridge import to_core
from pipeline.defs.latent_store.record import LatentStoreRecord
from pipeline.defs.ldm_model.config import DEFAULT_PROMPTS, LdmModelConfig, complete_ldm_training
from pipeline.defs.ldm_model.record import REGISTERED_NAME, LdmModelRecord
from pipeline.distributed import launch
from pipeline.distributed.entry import PROGRESS_KEYS
from pipeline.distributed.specs import LdmTrainSpec, ldm_training_data
from pipeline.init_from import InitPlan, StoreShapes, plan_init, stage_weights
from pipeline.mlflow_models import (
    CODE_PATHS,
    TEXT_TO_IMAGE_CODE,
    TEXT_TO_IMAGE_PACKAGES,
    pinned_requirements,
    text_to_image_input_example,
    text_to_image_signature,
)
from pipeline.resources import ComputeResource, MLflowResource, StorageResource, TrackedRun
from pipeline.tracking import DagsterProgress, temp_dir
from pipeline.upstream import Upstream, lineage_metadata, read_upstream
from pipeline.validation import RunConfigCheck


def _training_config(
    config: LdmModelConfig, compute: ComputeResource, rec: LatentStoreRecord, store: LatentStore
) -> LDMTrainingConfig:
    """The run config's training section, with the shapes the latent store dictates where it leaves them unset and
    the compute settings."""
    completed = complete_ldm_training(
        config.training.model_dump(),
        latent_channels=rec.latent_shape[0],
        context_dim=rec.context_dim,
        pooled_dim=store.metadata.pooled_dim,
    )
    training = to_core(LDMTrainingConfig, completed, "ldm_model.training")
    return training.model_copy(update={"trainer": compute.apply(training.trainer)})


def _refuse_mismatches(training: LDMTrainingConfig, rec: LatentStoreRecord, store: LatentStore) -> None:
    """A denoiser or trainer setting the latent store cannot feed, as a Failure a retry would not mend."""
    den = training.denoiser
    if den.context_dim != rec.context_dim or den.in_channels != rec.latent_shape[0]:
        raise dg.Failure(
            f"denoiser expects context_dim={den.context_dim}, in_channels={den.in_channels} but the "
            f"latent store has context_dim={rec.context_dim}, latent channels={rec.latent_shape[0]}",
            allow_retries=False,
        )
    if takes_pooled(den) and den.pooled_dim != store.metadata.pooled_dim:
        raise dg.Failure(
            f"ldm_model.training.denoiser.pooled_projection_dim: the denoiser takes pooled vectors of "
            f"width {den.pooled_dim}, the latent store's text encoder gives {store.metadata.pooled_dim}; "
            "leave it unset",
            allow_retries=False,
        )
    if training.trainer.sample_posterior and store.metadata.content != "moments":
        raise dg.Failure(
            f"ldm_model.training.trainer.sample_posterior needs a latent store of posterior moments; "
            f"{rec.store_url} holds one {store.metadata.content} per image (latent_store.store."
            "content): set content: moments and materialize latent_store again, or leave it unset",
            allow_retries=False,
        )


def _store_text_encoder(rec: LatentStoreRecord) -> tuple[TextEncoderConfig, TextEncoder]:
    """The text encoder the store's captions came from: the registered model carries a copy of it."""
    text_cfg = TextEncoderConfig.model_validate(rec.text_encoder_config)
    text_encoder = TextEncoder(text_cfg)
    if text_encoder.identity != rec.text_encoder:
        raise dg.Failure(
            f"the text encoder {text_cfg.name!r} now loads as {text_encoder.identity}, but the latent "
            f"store's captions were embedded by {rec.text_encoder}: materialize latent_store "
            "again",
            allow_retries=False,
        )
    return text_cfg, text_encoder


def _register(
    run: TrackedRun,
    config: LdmModelConfig,
    bundle_kw: dict[str, Any],
    tags: dict[str, str],
) -> Any:
    """The bundle logged as the pyfunc `ldm` and registered as a new version (alias candidate)."""
    latent_shape, f = bundle_kw["latent_shape"], bundle_kw["vae"].config.downsample_factor
    with temp_dir() as tmp:
        save_text_to_image(tmp, **bundle_kw)
        return run.log_and_register_pyfunc(
            name="ldm",
            registered_name=REGISTERED_NAME,
            python_model=TEXT_TO_IMAGE_CODE,
            artifacts={"bundle": tmp},
            signature=text_to_image_signature(latent_shape[1] * f, latent_shape[2] * f),
            alias="candidate",
            input_example=text_to_image_input_example(
                config.validation_prompts[0] if config.validation_prompts else DEFAULT_PROMPTS[0]
            ),
            code_paths=CODE_PATHS,
            pip_requirements=pinned_requirements(TEXT_TO_IMAGE_PACKAGES),
            tags=tags,
        )


def _init(
    config: LdmModelConfig,
    mlflow: MLflowResource,
    training: LDMTrainingConfig,
    rec: LatentStoreRecord,
    store: LatentStore,
) -> InitPlan:
    """The starting weights (init_from), checked against the store before anything else: a source's network wins."""
    return plan_init(
        config.init_from,
        config.init_subfolder,
        configured=training.denoiser,
        denoiser_set=config.training.denoiser is not None,
        client=mlflow.client(),
        store=StoreShapes(rec.latent_shape, rec.context_dim, store.metadata.pooled_dim, rec.vae_uri),
        registered_name=REGISTERED_NAME,
    )


def _bundle(
    config: LdmModelConfig,
    training: LDMTrainingConfig,
    init: InitPlan,
    rec: LatentStoreRecord,
    text: tuple[TextEncoderConfig, TextEncoder],
    *,
    result: Any,
    vae: Any,
    backbone: dict[str, Any],
    mlflow_run_id: str,
) -> dict[str, Any]:
    """What `save_text_to_image` writes: the trained denoiser with the autoencoder, the text encoder and the sampling
    defaults, and the provenance a registered model carries (``info``)."""
    init_md = init.record()
    info = {
        "vae_uri": rec.vae_uri,
        "latent_store": rec.store_url,
        "mlflow_run_id": mlflow_run_id,
        "steps": result.step,
        "text_encoder": rec.text_encoder,
        "backbone": backbone,
        "lora": training.lora.to_dict() if training.lora is not None else None,
        "init_from": init_md["init_from"],
        "init_source_hash": init_md["init_source_hash"],
    }
    return dict(
        denoiser=result.model,
        vae=vae,
        diffusion_config=training.diffusion,
        text_encoder_config=text[0],
        text_encoder=text[1],  # copied into the bundle: the registered model carries it
        latent_shape=tuple(rec.latent_shape),
        guidance=config.guidance,
        info=info,
        # a LoRA adapter records the base it needs: the warm start's source, when there is one
        base_source=info["init_from"] if init.weights is not None else None,
    )


def _registry_tags(bundle_kw: dict[str, Any], model_url: str) -> dict[str, str]:
    info = bundle_kw["info"]
    return {
        "vae_uri": info["vae_uri"],
        "text_encoder": bundle_kw["text_encoder_config"].name,
        "storage_url": model_url,
        "latent_store": info["latent_store"],
        "backbone": describe_backbone(info["backbone"]),
        "init_from": info["init_from"],
        "init_source_hash": info["init_source_hash"],
    }


def _train_spec(
    config: LdmModelConfig,
    training: LDMTrainingConfig,
    init: InitPlan,
    rec: LatentStoreRecord,
    text_cfg: TextEncoderConfig,
    storage: StorageResource,
    key: str,
    run_key: str,
    mlflow: MLflowResource,
    mlflow_run_id: str,
) -> LdmTrainSpec:
    """What the trainer needs, in this process or on every rank under torchrun."""
    return LdmTrainSpec(
        training=training.to_dict(),
        store_url=rec.store_url,
        vae_url=rec.vae_url,
        text_encoder=text_cfg.to_dict(),
        latent_shape=list(rec.latent_shape),
        guidance=config.guidance,
        validation_prompts=config.validation_prompts,
        validation_seeds=config.validation_seeds,
        checkpoint_dir=storage.url("checkpoints", "ldm", key),
        init_sha256=init.weights.sha256 if init.weights else None,
        init_weights_url=stage_weights(init, lambda h: storage.url("init", "ldm", h)),
        output_url=storage.url("staging", "ldm", run_key),
        mlflow_tracking_uri=mlflow.resolved_tracking_uri(),
        mlflow_run_id=mlflow_run_id,
    )


def _final_loss(result: Any) -> float:
    return result.history["loss"][-1][1] if result.history.get("loss") else float("nan")


def _materialize_result(
    record: LdmModelRecord,
    result: Any,
    backbone: dict[str, Any],
    training: LDMTrainingConfig,
    init: InitPlan,
    launch_md: dict[str, Any],
    store_read: Upstream,
    run_url: str,
) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={
            **record.to_metadata(),
            "store_url": store_read.record.store_url,
            "steps": result.step,
            "resumed_from": result.resumed_from or 0,
            "final_loss": _final_loss(result),
            "samples_per_second": result.samples_per_second,
            "nonfinite_skipped": result.nonfinite_skipped,
            "backbone": describe_backbone(backbone),
            "backbone_info": json_md(backbone),
            # a LoRA run registers the base plus its adapter (the bundle's denoiser/lora/)
            **({"lora": json_md(training.lora.to_dict())} if training.lora is not None else {}),
            "mlflow_run": dg.MetadataValue.url(run_url),
            **init.record(),
            **launch_md,
            **lineage_metadata(store_read),
        },
        data_version=dg.DataVersion(f"{REGISTERED_NAME}-v{record.ldm_version}"),
    )


@dg.asset(
    **GPU_ASSET,
    deps=["latent_store"],
    kinds={"pytorch", "mlflow"},
    description=__doc__,
)
def ldm_model(
    context: dg.AssetExecutionContext,
    config: LdmModelConfig,
    mlflow: MLflowResource,
    storage: StorageResource,
    compute: ComputeResource,
    run_config_check: RunConfigCheck,
) -> dg.MaterializeResult:
    store_read = read_upstream(context, LatentStoreRecord)
    rec = store_read.record
    store = LatentStore(rec.store_url)
    training = _training_config(config, compute, rec, store)
    init = _init(config, mlflow, training, rec, store)
    context.log.info(f"init_from: {init.reason}")
    if init.weights is not None:
        training = training.model_copy(update={"denoiser": init.weights.config})
    _refuse_mismatches(training, rec, store)
    train = ldm_training_data(rec.store_url, training.trainer)
    section = config.training.denoiser
    backbone = backbone_summary(training.denoiser, section.preset if section is not None else None)
    context.log.info(f"denoiser: {describe_backbone(backbone)}")
    text_cfg, text_encoder = _store_text_encoder(rec)
    vae = load_autoencoder(rec.vae_url)
    # a warm start's checkpoints are its own: never resumed by a from-scratch run or one from other weights
    origin = [init.weights.sha256] if init.weights is not None else []
    key = stable_key(rec.store_url, rec.rows_total, training.to_dict(), *origin)
    run_key = f"{key}-{context.run.run_id[:8]}"

    with mlflow.materialization_run(context, system_metrics=True) as run:
        run.log_dataset(
            name=rec.asset,
            url=rec.store_url,
            digest=rec.store_version,
            context="training",
            tags={"vae_uri": rec.vae_uri, "rows": str(rec.rows_total)},
        )
        run.tracker.set_tags({"vae_uri": rec.vae_uri, "latent_store": rec.store_url})
        run.tracker.log_params(init.record())
        progress = DagsterProgress(context.log, "ldm", keys=PROGRESS_KEYS["ldm"])
        spec = _train_spec(config, training, init, rec, text_cfg, storage, key, run_key, mlflow, run.run_id)
        # in this process, or on compute.num_processes processes under torchrun: the same result either way
        result, launch_md = launch.train(
            context, compute, spec, FanoutTracker(run.tracker, progress), data=train, vae=vae
        )
        final_loss = _final_loss(result)
        bundle_kw = _bundle(
            config,
            training,
            init,
            rec,
            (text_cfg, text_encoder),
            result=result,
            vae=vae,
            backbone=backbone,
            mlflow_run_id=run.run_id,
        )
        model_url = storage.url("models", "ldm", run_key)
        save_text_to_image(model_url, **bundle_kw)
        mv = _register(run, config, bundle_kw, _registry_tags(bundle_kw, model_url))
        context.log.info(
            f"trained {result.step} steps (final loss {final_loss:.4f}); registered {REGISTERED_NAME} "
            f"v{mv.version} (alias candidate)"
        )
        record = LdmModelRecord(
            ldm_url=model_url,
            ldm_uri=f"models:/{REGISTERED_NAME}/{mv.version}",
            ldm_version=int(mv.version),
            vae_uri=rec.vae_uri,
            mlflow_run_id=run.run_id,
            mlflow_model_id=mv.model_id,
        )
        return _materialize_result(record, result, backbone, training, init, launch_md, store_read, run.url)
