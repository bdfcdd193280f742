"""`image_dataset`: canonical Parquet shards of the image–caption source (bad inputs dropped and counted)."""

import dagster as dg

from ldm_core import storage as ldm_storage
from ldm_core.data import IngestConfig, ingest, write_photo_crops_source, write_shapes_source
from ldm_core.data.canonical import read_manifest
from ldm_core.storage import redact_url
from pipeline.asset_common import GROUP, json_md, stable_key
from pipeline.config_bridge import to_core
from pipeline.defs.image_dataset.config import BUILTIN_SHAPES, PHOTOS_DATASET, ImageDatasetConfig
from pipeline.defs.image_dataset.record import ImageDatasetRecord
from pipeline.resources import MLflowResource, StorageResource
from pipeline.validation import RunConfigCheck


def _builtin_source(store: StorageResource, cfg: ImageDatasetConfig) -> str:
    url = store.url("sources", f"shapes-n{cfg.builtin_count}-s{cfg.builtin_seed}-{cfg.builtin_size}")
    if not ldm_storage.exists(ldm_storage.join(url, "metadata.jsonl")):  # deterministic: generate once
        write_shapes_source(url, cfg.builtin_count, seed=cfg.builtin_seed, size=cfg.builtin_size)
    return url


def _photo_crops(storage: StorageResource, config: ImageDatasetConfig) -> str | None:
    """The natural-photo crops, all held out, for the reconstruction checks (None: photo_crops 0)."""
    if config.photo_crops <= 0:
        return None
    photo_src = storage.url("sources", f"photos-{config.photo_size}-{config.photo_crops}")
    if not ldm_storage.exists(ldm_storage.join(photo_src, "metadata.jsonl")):
        write_photo_crops_source(photo_src, size=config.photo_size, per_image=config.photo_crops)
    photos_url = storage.url("datasets", PHOTOS_DATASET)
    ingest(IngestConfig(source=photo_src, val_fraction=1.0), photos_url)
    return photos_url


@dg.asset(group_name=GROUP, kinds={"parquet"}, description=__doc__)
def image_dataset(
    context: dg.AssetExecutionContext,
    config: ImageDatasetConfig,
    mlflow: MLflowResource,
    storage: StorageResource,
    run_config_check: RunConfigCheck,
) -> dg.MaterializeResult:
    source = _builtin_source(storage, config) if config.source == BUILTIN_SHAPES else config.source
    ingest_cfg = to_core(IngestConfig, {**config.ingest.model_dump(), "source": source}, "image_dataset.ingest")
    out_url = storage.url("datasets", config.name)
    with mlflow.materialization_run(context) as run:
        # the source as a user may type it, s3://key:secret@bucket/…: params, metadata and logs get it redacted
        run.tracker.log_params({**ingest_cfg.to_dict(), "source": redact_url(ingest_cfg.source)})
        result = ingest(ingest_cfg, out_url)
        photos_url = _photo_crops(storage, config)
        bad_total = sum(result.bad.values())
        bad_fraction = bad_total / max(result.rows_examined, 1)
        run.tracker.log_metrics(
            {
                "rows_total": result.rows_total,
                "rows_new": result.rows_new,
                "bad_total": bad_total,
                "bad_fraction": bad_fraction,
                "check_max_bad_fraction": config.check_max_bad_fraction,
                **{f"bad.{k}": v for k, v in result.bad.items()},
            },
            step=0,
        )
        run.tracker.log_dict(result.to_dict(), "ingest_result.json")
        manifest = read_manifest(out_url)
        version = stable_key([s.model_dump() for s in manifest.shards]) if manifest else "empty"
        context.log.info(
            f"ingested {result.rows_new} new rows ({result.rows_total} total) into {out_url}; "
            f"bad inputs: {dict(result.bad) or 'none'}"
        )
        record = ImageDatasetRecord(
            dataset_url=out_url,
            dataset_version=version,
            photos_url=photos_url,
            rows_total=result.rows_total,
            bad_fraction=bad_fraction,
            check_max_bad_fraction=config.check_max_bad_fraction,
        )
        return dg.MaterializeResult(
            metadata={
                **record.to_metadata(),
                "rows_new": result.rows_new,
                "train_rows": result.train_rows_total,
                "validation_rows": result.validation_rows_total,
                "shards": len(result.shards),
                "new_shards": len(result.new_shards),
                "bad_total": bad_total,
                "bad_by_reason": json_md(result.bad),
                "converted": json_md(result.converted),
                "skipped_duplicates": result.skipped_duplicates,
                "mlflow_run": dg.MetadataValue.url(run.url),
            },
            data_version=dg.DataVersion(version),
        )
