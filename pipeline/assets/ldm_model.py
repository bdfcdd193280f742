"""`ldm_model`: the text-conditioned denoiser (EMA) trained on the latent store, registered as `ldm` (a pyfunc).

The backbone is the run config's ``denoiser.kind``: the UNet (default) or the MMDiT (``{kind: mmdit, preset: …}``)."""

import dagster as dg

from ldm_core.bundle import load_autoencoder, save_text_to_image
from ldm_core.data.latent_store.reader import LatentStore
from ldm_core.models.denoiser import backbone_summary, describe_backbone, takes_pooled
from ldm_core.text_encoder import TextEncoder, TextEncoderConfig
from ldm_core.tracking import FanoutTracker
from ldm_core.trainers.ldm import LDMTrainingConfig
from pipeline.asset_config import DEFAULT_PROMPTS, LdmModelConfig, complete_ldm_training
from pipeline.assets.common import (
    GPU_OP_TAGS,
    GPU_POOL,
    GPU_RETRY_POLICY,
    GROUP,
    json_md,
    stable_key,
)
from pipeline.assets.upstream import lineage_metadata, read_upstream
from pipeline.config_bridge import to_core
from pipeline.distributed import launch
from pipeline.distributed.entry import PROGRESS_KEYS
from pipeline.distributed.specs import LdmTrainSpec, ldm_training_data
from pipeline.init_from import StoreShapes, plan_init, stage_weights
from pipeline.mlflow_models import (
    CODE_PATHS,
    TEXT_TO_IMAGE_CODE,
    TEXT_TO_IMAGE_PACKAGES,
    pinned_requirements,
    text_to_image_input_example,
    text_to_image_signature,
)
from pipeline.resources import ComputeResource, MLflowResource, StorageResource
from pipeline.tracking import DagsterProgress, temp_dir
from pipeline.validation import RunConfigCheck

REGISTERED_NAME = "ldm"


@dg.asset(
    group_name=GROUP,
    deps=["latent_store"],
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    retry_policy=GPU_RETRY_POLICY,
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
    store_read = read_upstream(context, "latent_store")
    store_md = store_read.metadata
    store = LatentStore(store_md["store_url"])
    # the shapes the latent store dictates, where the run config leaves them unset
    completed = complete_ldm_training(
        config.training.model_dump(),
        latent_channels=int(store_md["latent_shape"][0]),
        context_dim=int(store_md["context_dim"]),
        pooled_dim=store.metadata.pooled_dim,
    )
    training = to_core(LDMTrainingConfig, completed, "ldm_model.training")
    training = training.model_copy(update={"trainer": compute.apply(training.trainer)})
    # the starting weights (init_from), checked against the store before anything else: a source's network wins
    init = plan_init(
        config.init_from,
        config.init_subfolder,
        configured=training.denoiser,
        denoiser_set=config.training.denoiser is not None,
        client=mlflow.client(),
        store=StoreShapes(
            tuple(store_md["latent_shape"]),
            int(store_md["context_dim"]),
            store.metadata.pooled_dim,
            store_md["vae_uri"],
        ),
        registered_name=REGISTERED_NAME,
    )
    context.log.info(f"init_from: {init.reason}")
    if init.weights is not None:
        training = training.model_copy(update={"denoiser": init.weights.config})
    den = training.denoiser
    if den.context_dim != store_md["context_dim"] or den.in_channels != store_md["latent_shape"][0]:
        raise dg.Failure(
            f"denoiser expects context_dim={den.context_dim}, in_channels={den.in_channels} but the "
            f"latent store has context_dim={store_md['context_dim']}, latent channels={store_md['latent_shape'][0]}",
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
            f"{store_md['store_url']} holds one {store.metadata.content} per image (latent_store.store."
            "content): set content: moments and materialize latent_store again, or leave it unset",
            allow_retries=False,
        )
    train = ldm_training_data(store_md["store_url"], training.trainer)
    section = config.training.denoiser
    backbone = backbone_summary(den, section.preset if section is not None else None)
    context.log.info(f"denoiser: {describe_backbone(backbone)}")
    text_cfg = TextEncoderConfig.model_validate(store_md["text_encoder_config"])
    # the registered model carries a copy of the text encoder: it must be the one the store's captions came from
    text_encoder = TextEncoder(text_cfg)
    if text_encoder.identity != store_md["text_encoder"]:
        raise dg.Failure(
            f"the text encoder {text_cfg.name!r} now loads as {text_encoder.identity}, but the latent "
            f"store's captions were embedded by {store_md['text_encoder']}: materialize latent_store "
            "again",
            allow_retries=False,
        )
    vae = load_autoencoder(store_md["vae_url"])
    latent_shape = tuple(store_md["latent_shape"])
    # a warm start's checkpoints are its own: never resumed by a from-scratch run or one from other weights
    key = stable_key(
        store_md["store_url"],
        store_md["rows_total"],
        training.to_dict(),
        *([init.weights.sha256] if init.weights is not None else []),
    )
    ckpt_dir = storage.url("checkpoints", "ldm", key)

    with mlflow.materialization_run(context) as run:
        run.tracker.set_tags({"vae_uri": store_md["vae_uri"], "latent_store": store_md["store_url"]})
        run.tracker.log_params(init.record())
        progress = DagsterProgress(context.log, "ldm", keys=PROGRESS_KEYS["ldm"])
        spec = LdmTrainSpec(
            training=training.to_dict(),
            store_url=store_md["store_url"],
            vae_url=store_md["vae_url"],
            text_encoder=text_cfg.to_dict(),
            latent_shape=list(latent_shape),
            guidance=config.guidance,
            validation_prompts=config.validation_prompts,
            validation_seeds=config.validation_seeds,
            checkpoint_dir=ckpt_dir,
            init_sha256=init.weights.sha256 if init.weights else None,
            init_weights_url=stage_weights(init, lambda h: storage.url("init", "ldm", h)),
            output_url=storage.url("staging", "ldm", f"{key}-{context.run.run_id[:8]}"),
            mlflow_tracking_uri=mlflow.resolved_tracking_uri(),
            mlflow_run_id=run.run_id,
        )
        # in this process, or on compute.num_processes processes under torchrun: the same result either way
        result, launch_md = launch.train(
            context, compute, spec, FanoutTracker(run.tracker, progress), data=train, vae=vae
        )
        final_loss = result.history["loss"][-1][1] if result.history.get("loss") else float("nan")
        info = {
            "vae_uri": store_md["vae_uri"],
            "latent_store": store_md["store_url"],
            "mlflow_run_id": run.run_id,
            "steps": result.step,
            "text_encoder": store_md["text_encoder"],
            "backbone": backbone,
            "lora": training.lora.to_dict() if training.lora is not None else None,
            "init_from": init.record()["init_from"],
            "init_source_hash": init.record()["init_source_hash"],
        }
        bundle_kw = dict(
            denoiser=result.model,
            vae=vae,
            diffusion_config=training.diffusion,
            text_encoder_config=text_cfg,
            text_encoder=text_encoder,  # copied into the bundle: the registered model carries it
            latent_shape=latent_shape,
            guidance=config.guidance,
            info=info,
            # a LoRA adapter records the base it needs: the warm start's source, when there is one
            base_source=info["init_from"] if init.weights is not None else None,
        )
        model_url = storage.url("models", "ldm", f"{key}-{context.run.run_id[:8]}")
        save_text_to_image(model_url, **bundle_kw)
        f = vae.config.downsample_factor
        with temp_dir() as tmp:
            save_text_to_image(tmp, **bundle_kw)
            mv = run.log_and_register_pyfunc(
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
                tags={
                    "vae_uri": store_md["vae_uri"],
                    "text_encoder": text_cfg.name,
                    "storage_url": model_url,
                    "latent_store": store_md["store_url"],
                    "backbone": describe_backbone(backbone),
                    "init_from": info["init_from"],
                    "init_source_hash": info["init_source_hash"],
                },
            )
        context.log.info(
            f"trained {result.step} steps (final loss {final_loss:.4f}); registered {REGISTERED_NAME} "
            f"v{mv.version} (alias candidate)"
        )
        return dg.MaterializeResult(
            metadata={
                "ldm_url": model_url,
                "ldm_uri": f"models:/{REGISTERED_NAME}/{mv.version}",
                "ldm_version": int(mv.version),
                "vae_uri": store_md["vae_uri"],
                "store_url": store_md["store_url"],
                "steps": result.step,
                "resumed_from": result.resumed_from or 0,
                "final_loss": final_loss,
                "samples_per_second": result.samples_per_second,
                "nonfinite_skipped": result.nonfinite_skipped,
                "backbone": describe_backbone(backbone),
                "backbone_info": json_md(backbone),
                # a LoRA run registers the base plus its adapter (the bundle's denoiser/lora/)
                **({"lora": json_md(training.lora.to_dict())} if training.lora is not None else {}),
                "mlflow_run_id": run.run_id,
                "mlflow_run": dg.MetadataValue.url(run.url),
                "mlflow_model_id": mv.model_id,
                **init.record(),
                **launch_md,
                **lineage_metadata(store_read),
            },
            data_version=dg.DataVersion(f"{REGISTERED_NAME}-v{mv.version}"),
        )
