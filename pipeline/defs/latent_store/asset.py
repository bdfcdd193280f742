"""`latent_store`: every image encoded once by the frozen VAE + its caption by the text encoder (Zarr or Parquet)."""

import dagster as dg

from ldm_core.bundle import load_autoencoder
from ldm_core.data.latent_store.encoding import encode_dataset
from ldm_core.data.latent_store.reader import LatentStore
from ldm_core.data.latent_store.schema import FORMAT as STORE_FORMAT
from ldm_core.data.latent_store.schema import LatentStoreConfig
from ldm_core.text_encoder import TextEncoder, TextEncoderConfig
from pipeline.asset_common import GPU_ASSET, stable_key
from pipeline.config_bridge import to_core
from pipeline.defs.image_dataset.record import ImageDatasetRecord
from pipeline.defs.latent_store.config import LatentStoreAssetConfig
from pipeline.defs.latent_store.record import LatentStoreRecord
from pipeline.defs.vae_model.record import VaeModelRecord
from pipeline.resources import ComputeResource, MLflowResource, StorageResource, TrackedRun
from pipeline.upstream import lineage_metadata, read_upstream
from pipeline.validation import RunConfigCheck


def _store_config(config: LatentStoreAssetConfig, vae: VaeModelRecord) -> LatentStoreConfig:
    """The store's config; its resolution, unless set, the autoencoder's training resolution."""
    store_data = {k: v for k, v in config.store.model_dump().items() if v is not None}
    store_data.setdefault("resolution", vae.resolution)
    return to_core(LatentStoreConfig, store_data, "latent_store.store")


def _log_params(
    run: TrackedRun, vae: VaeModelRecord, store_url: str, store_cfg: LatentStoreConfig, text_cfg: TextEncoderConfig
) -> None:
    run.tracker.log_params(
        {
            "vae_uri": vae.vae_uri,
            "store_url": store_url,
            **{f"store.{k}": v for k, v in store_cfg.to_dict().items()},
            **{f"text_encoder.{k}": v for k, v in text_cfg.to_dict().items()},
        }
    )


@dg.asset(
    **GPU_ASSET,
    deps=["image_dataset", "vae_model"],
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
    ds_read, vae_read = read_upstream(context, ImageDatasetRecord), read_upstream(context, VaeModelRecord)
    ds, vae_rec = ds_read.record, vae_read.record
    store_cfg = _store_config(config, vae_rec)
    text_cfg = to_core(TextEncoderConfig, config.text_encoder, "latent_store.text_encoder")
    device = compute.torch_device()
    vae = load_autoencoder(vae_rec.vae_url)
    text_encoder = TextEncoder(text_cfg, device=device)
    # one store per (dataset, VAE version, encoding options, store format): new data extends it; a new VAE, or a
    # version of this code that writes another format, starts another (ldm_core refuses a store of another format)
    key = stable_key(ds.dataset_url, store_cfg.to_dict(), text_cfg.to_dict(), STORE_FORMAT)
    store_url = storage.url("latents", f"vae-v{vae_rec.vae_version}-{key}")

    def progress(p) -> None:
        context.log.info(
            f"encoded {p.source} ({p.rows} rows): shard {p.shards_done}/{p.shards_todo}, {p.rows_done} rows so far"
        )

    with mlflow.materialization_run(context, system_metrics=True) as run:
        _log_params(run, vae_rec, store_url, store_cfg, text_cfg)
        result = encode_dataset(
            ds.dataset_url,
            store_url,
            vae,
            text_encoder,
            store_cfg,
            vae_identity=vae_rec.vae_uri,
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
        shards = LatentStore(store_url).metadata.shards
        record = LatentStoreRecord(
            store_url=store_url,
            store_version=stable_key([s.model_dump() for s in shards]),
            vae_uri=vae_rec.vae_uri,
            vae_url=vae_rec.vae_url,
            rows_total=result.rows_total,
            latent_shape=vae_rec.latent_shape,
            text_encoder=text_encoder.identity,
            text_encoder_config=text_cfg.to_dict(),
            context_dim=text_encoder.dim,
            check_std_tolerance=config.check_std_tolerance,
            check_sample_rows=config.check_sample_rows,
        )
        return dg.MaterializeResult(
            metadata={
                **record.to_metadata(),
                "rows_new": result.rows_new,
                "shards_total": result.shards_total,
                "shards_new": result.shards_new,
                "images_per_second": result.images_per_second,
                "pooled_dim": text_encoder.pooled_dim,
                "pooling": text_encoder.pooling,
                "backend": store_cfg.backend,
                "mlflow_run": dg.MetadataValue.url(run.url),
                **lineage_metadata(ds_read, vae_read),
            },
            data_version=dg.DataVersion(f"{vae_rec.vae_uri}|rows={result.rows_total}"),
        )
