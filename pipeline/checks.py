"""Asset checks: each reads what its asset recorded in the check's own run (`read_upstream`; and, for the latents,
the data itself) and passes or fails; its metadata names the materialization it checked.

The autoencoder's and the latent store's checks are blocking: when one fails, nothing downstream of that asset runs
in the same run (an LDM trained on latents of a broken autoencoder would be thrown away anyway).
"""

import math

import dagster as dg

from ldm_core.data.latent_dataset import LatentDataset
from ldm_core.evaluation.fidelity import FidelityThresholds, fidelity_verdict
from pipeline.asset_config import ImageDatasetConfig, LatentStoreAssetConfig, VaeModelConfig
from pipeline.assets.upstream import lineage_metadata, read_upstream


def _default(config_class: type[dg.Config], field: str) -> object:
    """A field's default in the asset config: the threshold of a materialization recorded before it stored its own."""
    return config_class.model_fields[field].default


@dg.asset_check(
    asset="image_dataset",
    description="The dataset is non-empty and its bad-input fraction is below the configured threshold.",
)
def image_dataset_quality(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    read = read_upstream(context, "image_dataset")
    md = read.metadata
    rows, frac = md["rows_total"], md["bad_fraction"]
    limit = md.get("check_max_bad_fraction", _default(ImageDatasetConfig, "check_max_bad_fraction"))
    passed = rows > 0 and frac <= limit
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"rows_total": rows, "bad_fraction": frac, "threshold": limit, **lineage_metadata(read)},
        description=None if passed else f"rows={rows}, bad fraction {frac:.3f} (limit {limit})",
    )


@dg.asset_check(
    asset="vae_model",
    blocking=True,
    description="Held-out reconstruction PSNR of the trained autoencoder is above the configured floor.",
)
def vae_reconstruction_psnr(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    read = read_upstream(context, "vae_model")
    md = read.metadata
    psnr, floor = md["val_psnr"], md.get("psnr_floor", _default(VaeModelConfig, "psnr_floor"))
    passed = math.isfinite(psnr) and psnr >= floor
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"val_psnr": psnr, "floor": floor, **lineage_metadata(read)},
        description=None if passed else f"PSNR {psnr:.2f} dB below the floor {floor} dB",
    )


@dg.asset_check(
    asset="vae_model",
    blocking=True,
    description="Held-out reconstructions keep every colour (per colour class where the data has one), "
    "their worst decile stays above a PSNR floor, no RGB channel shifts, and what stands out "
    "from the background keeps its colour: failures a mean PSNR hides.",
)
def vae_reconstruction_fidelity(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    read = read_upstream(context, "vae_model")
    md = read.metadata
    fidelity = md["fidelity"]
    passed, reasons = fidelity_verdict(fidelity, FidelityThresholds.model_validate(md["fidelity_thresholds"]))
    classes = fidelity.get("classes") or {}
    metadata = {
        "worst_decile_psnr": fidelity["worst_decile_psnr"],
        "channel_shift": dg.MetadataValue.json(fidelity["channel_shift"]),
        **(
            {"worst_decile_foreground_shift": fidelity["worst_decile_foreground_shift"]}
            if fidelity.get("worst_decile_foreground_shift") is not None
            else {}
        ),
        **{f"{name}_accuracy": c["accuracy"] for name, c in classes.items()},
        "thresholds": dg.MetadataValue.json(md["fidelity_thresholds"]),
        **lineage_metadata(read),
    }
    return dg.AssetCheckResult(passed=passed, metadata=metadata, description="; ".join(reasons) or None)


@dg.asset_check(
    asset="latent_store",
    blocking=True,
    description="Stored latents are finite and have std ≈ 1 after the latent scale.",
)
def latents_finite_and_scaled(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    read = read_upstream(context, "latent_store")
    md = read.metadata
    ds = LatentDataset(md["store_url"], split=None)
    n = min(len(ds), int(md.get("check_sample_rows", _default(LatentStoreAssetConfig, "check_sample_rows"))))
    z = ds.get_batch(list(range(n)))["latents"]
    finite = bool(z.isfinite().all())
    std = float(z.float().std()) if finite else float("nan")
    tol = float(md.get("check_std_tolerance", _default(LatentStoreAssetConfig, "check_std_tolerance")))
    passed = finite and abs(std - 1.0) <= tol
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"rows_checked": n, "finite": finite, "std": std, "tolerance": tol, **lineage_metadata(read)},
        description=None if passed else f"finite={finite}, std={std:.3f} (want 1 ± {tol})",
    )


ALL_CHECKS = [image_dataset_quality, vae_reconstruction_psnr, vae_reconstruction_fidelity, latents_finite_and_scaled]
