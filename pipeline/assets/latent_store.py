"""`latent_store`: every image encoded once by the frozen VAE + its caption by the text encoder (Zarr or Parquet)."""

import dagster as dg

from ldm_core.bundle import load_autoencoder
from ldm_core.data.latent_store.encoding import encode_dataset
from ldm_core.data.latent_store.schema import LatentStoreConfig
from ldm_core.text_encoder import TextEncoder, TextEncoderConfig
from pipeline.asset_config import LatentStoreAssetConfig
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
from pipeline.resources import ComputeResource, MLflowResource, StorageResource
from pipeline.validation import RunConfigCheck


@dg.asset(
    group_name=GROUP,
    deps=["image_dataset", "vae_model"],
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    retry_policy=GPU_RETRY_POLICY,
    kinds={"zarr", "pytorch"},
    description=__doc__,
)
def latent_store(
    context: dg.AssetExecutionContext,
    config: LatentStoreAssetConfig,
    mlflow: MLflowResource,
    storage: StorageResource,
    compute: ComputeResource,
    run_config_check: RunConfigCheck,
) -> dg.MaterializeResult:
    reads = read_upstream(context, "image_dataset"), read_upstream(context, "vae_model")
    ds, vae_md = (r.metadata for r in reads)
    store_data = {k: v for k, v in config.store.model_dump().items() if v is not None}
    store_data.setdefault("resolution", vae_md.get("resolution"))
    store_cfg = to_core(LatentStoreConfig, store_data, "latent_store.store")
    text_cfg = to_core(TextEncoderConfig, config.text_encoder, "latent_store.text_encoder")
    device = compute.torch_device()
    vae = load_autoencoder(vae_md["vae_url"])
    text_encoder = TextEncoder(text_cfg, device=device)
    # one store per (dataset, VAE version, encoding options): new data extends it, a new VAE starts another
    key = stable_key(ds["dataset_url"], store_cfg.to_dict(), text_cfg.to_dict())
    store_url = storage.url("latents", f"vae-v{vae_md['vae_version']}-{key}")

    def progress(p) -> None:
        context.log.info(
            f"encoded {p.source} ({p.rows} rows): shard {p.shards_done}/{p.shards_todo}, {p.rows_done} rows so far"
        )

    with mlflow.materialization_run(context) as run:
        run.tracker.log_params(
            {
                "vae_uri": vae_md["vae_uri"],
                "store_url": store_url,
                **{f"store.{k}": v for k, v in store_cfg.to_dict().items()},
                **{f"text_encoder.{k}": v for k, v in text_cfg.to_dict().items()},
            }
        )
        result = encode_dataset(
            ds["dataset_url"],
            store_url,
            vae,
            text_encoder,
            store_cfg,
            vae_identity=vae_md["vae_uri"],
            device=device,
            progress=progress,
        )
        run.tracker.log_metrics(
            {
                "rows_total": result.rows_total,
                "rows_new": result.rows_new,
                "images_per_second": result.images_per_second,
            },
            step=0,
        )
        context.log.info(
            f"{result.rows_new} new rows encoded ({result.rows_total} total) at "
            f"{result.images_per_second:.1f} images/s into {store_url}"
        )
        return dg.MaterializeResult(
            metadata={
                "store_url": store_url,
                "vae_uri": vae_md["vae_uri"],
                "vae_url": vae_md["vae_url"],
                "rows_total": result.rows_total,
                "rows_new": result.rows_new,
                "shards_total": result.shards_total,
                "shards_new": result.shards_new,
                "images_per_second": result.images_per_second,
                "text_encoder": text_encoder.identity,
                "text_encoder_config": json_md(text_cfg.to_dict()),
                "context_dim": text_encoder.dim,
                "pooled_dim": text_encoder.pooled_dim,
                "pooling": text_encoder.pooling,
                "latent_shape": vae_md["latent_shape"],
                "backend": store_cfg.backend,
                "check_std_tolerance": config.check_std_tolerance,
                "check_sample_rows": config.check_sample_rows,
                "mlflow_run": dg.MetadataValue.url(run.url),
                **lineage_metadata(*reads),
            },
            data_version=dg.DataVersion(f"{vae_md['vae_uri']}|rows={result.rows_total}"),
        )
