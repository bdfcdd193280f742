"""`image_dataset`: canonical Parquet shards of the image–caption source (bad inputs dropped and counted)."""

import dagster as dg
from pydantic import Field

from ldm_core import storage as ldm_storage
from ldm_core.data import IngestConfig, ingest, write_photo_crops_source, write_shapes_source
from ldm_core.data.canonical import read_manifest
from pipeline.assets.common import GROUP, json_md, stable_key
from pipeline.config_bridge import dagster_config, to_core
from pipeline.resources import MLflowResource, StorageResource

BUILTIN_SHAPES = "builtin://shapes"

IngestSection = dagster_config(IngestConfig, exclude=("source",))


class ImageDatasetConfig(dg.Config):
    source: str = Field(default=BUILTIN_SHAPES, description="fsspec URL of the image–caption source (local path, "
                        "file://, s3://…), or builtin://shapes for the embedded default dataset.")
    name: str = Field(default="default", description="Dataset name: shards land in <storage>/datasets/<name>.")
    builtin_count: int = Field(default=2000, description="builtin://shapes: number of images to generate.")
    builtin_seed: int = Field(default=0, description="builtin://shapes: generator seed (same seed, same images).")
    builtin_size: int = Field(default=32, description="builtin://shapes: image side in pixels.")
    photo_crops: int = Field(default=8, description="Crops per scikit-image photo for the natural-image "
                             "reconstruction set (<storage>/datasets/photos); 0 skips it.")
    photo_size: int = Field(default=32, description="Side of the photo crops.")
    check_max_bad_fraction: float = Field(default=0.1, description="Asset check: the fraction of bad inputs must "
                                          "stay below this (ingestion itself fails above ingest.max_bad_fraction).")
    ingest: IngestSection = Field(default_factory=IngestSection, description="Ingestion options (ldm_core IngestConfig).")  # type: ignore[valid-type]


def _builtin_source(store: StorageResource, cfg: ImageDatasetConfig) -> str:
    url = store.url("sources", f"shapes-n{cfg.builtin_count}-s{cfg.builtin_seed}-{cfg.builtin_size}")
    if not ldm_storage.exists(ldm_storage.join(url, "metadata.jsonl")):  # deterministic: generate once
        write_shapes_source(url, cfg.builtin_count, seed=cfg.builtin_seed, size=cfg.builtin_size)
    return url


@dg.asset(group_name=GROUP, kinds={"parquet"}, description=__doc__)
def image_dataset(context: dg.AssetExecutionContext, config: ImageDatasetConfig, mlflow: MLflowResource,
                  storage: StorageResource) -> dg.MaterializeResult:
    source = _builtin_source(storage, config) if config.source == BUILTIN_SHAPES else config.source
    ingest_cfg = to_core(IngestConfig, {**config.ingest.model_dump(), "source": source}, "image_dataset.ingest")
    out_url = storage.url("datasets", config.name)
    with mlflow.materialization_run(context) as run:
        run.tracker.log_params({"source": config.source, **ingest_cfg.to_dict()})
        result = ingest(ingest_cfg, out_url)
        photos_url = None
        if config.photo_crops > 0:
            photo_src = storage.url("sources", f"photos-{config.photo_size}-{config.photo_crops}")
            if not ldm_storage.exists(ldm_storage.join(photo_src, "metadata.jsonl")):
                write_photo_crops_source(photo_src, size=config.photo_size, per_image=config.photo_crops)
            photos_url = storage.url("datasets", "photos")
            ingest(IngestConfig(source=photo_src, val_fraction=1.0), photos_url)  # all held out
        bad_total = sum(result.bad.values())
        bad_fraction = bad_total / max(result.rows_examined, 1)
        run.tracker.log_metrics({"rows_total": result.rows_total, "rows_new": result.rows_new,
                                 "bad_total": bad_total, "bad_fraction": bad_fraction, "check_max_bad_fraction": config.check_max_bad_fraction,
                                 **{f"bad.{k}": v for k, v in result.bad.items()}}, step=0)
        run.tracker.log_dict(result.to_dict(), "ingest_result.json")
        manifest = read_manifest(out_url)
        version = stable_key([s.model_dump() for s in manifest.shards]) if manifest else "empty"
        context.log.info(f"ingested {result.rows_new} new rows ({result.rows_total} total) into {out_url}; "
                         f"bad inputs: {dict(result.bad) or 'none'}")
        return dg.MaterializeResult(
            metadata={
                "dataset_url": out_url, "dataset_version": version, "photos_url": photos_url or "",
                "rows_total": result.rows_total, "rows_new": result.rows_new,
                "train_rows": result.train_rows_total, "validation_rows": result.validation_rows_total,
                "shards": len(result.shards), "new_shards": len(result.new_shards),
                "bad_total": bad_total, "bad_fraction": bad_fraction, "check_max_bad_fraction": config.check_max_bad_fraction, "bad_by_reason": json_md(result.bad),
                "converted": json_md(result.converted), "skipped_duplicates": result.skipped_duplicates,
                "mlflow_run": dg.MetadataValue.url(run.url),
            },
            data_version=dg.DataVersion(version),
        )
