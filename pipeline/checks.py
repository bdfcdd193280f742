"""Asset checks: each reads what its asset recorded (and, for the latents, the data itself) and passes or fails."""


import math

import dagster as dg

from pipeline.assets.common import upstream_metadata


@dg.asset_check(asset="image_dataset", description="The dataset is non-empty and its bad-input fraction is below the configured threshold.")
def image_dataset_quality(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    md = upstream_metadata(context, "image_dataset")
    rows, frac, limit = md["rows_total"], md["bad_fraction"], md.get("check_max_bad_fraction", 0.1)
    passed = rows > 0 and frac <= limit
    return dg.AssetCheckResult(passed=passed, metadata={"rows_total": rows, "bad_fraction": frac, "threshold": limit},
                               description=None if passed else f"rows={rows}, bad fraction {frac:.3f} (limit {limit})")


@dg.asset_check(asset="vae_model", description="Held-out reconstruction PSNR of the trained autoencoder is above the configured floor.")
def vae_reconstruction_psnr(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    md = upstream_metadata(context, "vae_model")
    psnr, floor = md["val_psnr"], md.get("psnr_floor", 15.0)
    passed = math.isfinite(psnr) and psnr >= floor
    return dg.AssetCheckResult(passed=passed, metadata={"val_psnr": psnr, "floor": floor},
                               description=None if passed else f"PSNR {psnr:.2f} dB below the floor {floor} dB")


@dg.asset_check(asset="latent_store", description="Stored latents are finite and have std ≈ 1 after the latent scale.")
def latents_finite_and_scaled(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    from ldm_core.data.latent_dataset import LatentDataset

    md = upstream_metadata(context, "latent_store")
    ds = LatentDataset(md["store_url"], split=None)
    n = min(len(ds), int(md.get("check_sample_rows", 512)))
    z = ds.get_batch(list(range(n)))["latents"]
    finite = bool(z.isfinite().all())
    std = float(z.float().std()) if finite else float("nan")
    tol = float(md.get("check_std_tolerance", 0.35))
    passed = finite and abs(std - 1.0) <= tol
    return dg.AssetCheckResult(passed=passed, metadata={"rows_checked": n, "finite": finite, "std": std, "tolerance": tol},
                               description=None if passed else f"finite={finite}, std={std:.3f} (want 1 ± {tol})")


ALL_CHECKS = [image_dataset_quality, vae_reconstruction_psnr, latents_finite_and_scaled]
