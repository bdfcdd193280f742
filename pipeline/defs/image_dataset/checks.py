"""The asset check of `image_dataset`."""

import dagster as dg

from pipeline.defs.image_dataset.record import ImageDatasetRecord
from pipeline.upstream import lineage_metadata, read_upstream


@dg.asset_check(
    asset="image_dataset",
    description="The dataset is non-empty and its bad-input fraction is below the configured threshold.",
)
def image_dataset_quality(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    read = read_upstream(context, ImageDatasetRecord)
    ds = read.record
    passed = ds.rows_total > 0 and ds.bad_fraction <= ds.check_max_bad_fraction
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            "rows_total": ds.rows_total,
            "bad_fraction": ds.bad_fraction,
            "threshold": ds.check_max_bad_fraction,
            **lineage_metadata(read),
        },
        description=None
        if passed
        else f"rows={ds.rows_total}, bad fraction {ds.bad_fraction:.3f} (limit {ds.check_max_bad_fraction})",
    )
