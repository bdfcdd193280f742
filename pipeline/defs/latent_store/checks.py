"""The asset check of `latent_store`: blocking, since an LDM trained on broken latents would be thrown away anyway."""

import dagster as dg

from ldm_core.data.latent_dataset import LatentDataset
from pipeline.defs.latent_store.record import LatentStoreRecord
from pipeline.upstream import lineage_metadata, read_upstream


@dg.asset_check(
    asset="latent_store",
    blocking=True,
    description="Stored latents are finite and have std ≈ 1 after the latent scale.",
)
def latents_finite_and_scaled(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    read = read_upstream(context, LatentStoreRecord)
    store = read.record
    ds = LatentDataset(store.store_url, split=None)
    n = min(len(ds), store.check_sample_rows)
    z = ds.get_batch(list(range(n)))["latents"]
    finite = bool(z.isfinite().all())
    std = float(z.float().std()) if finite else float("nan")
    tol = store.check_std_tolerance
    passed = finite and abs(std - 1.0) <= tol
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"rows_checked": n, "finite": finite, "std": std, "tolerance": tol, **lineage_metadata(read)},
        description=None if passed else f"finite={finite}, std={std:.3f} (want 1 ± {tol})",
    )
