"""The asset checks of `vae_model`. Both are blocking: an LDM trained on latents of a broken autoencoder would be thrown
away anyway, so when one fails nothing downstream runs in the same run."""

import math

import dagster as dg

from ldm_core.evaluation.fidelity import FidelityThresholds, fidelity_verdict
from pipeline.defs.vae_model.record import VaeModelRecord
from pipeline.upstream import lineage_metadata, read_upstream


@dg.asset_check(
    asset="vae_model",
    blocking=True,
    description="Held-out reconstruction PSNR of the trained autoencoder is above the configured floor.",
)
def vae_reconstruction_psnr(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    read = read_upstream(context, VaeModelRecord)
    vae = read.record
    passed = math.isfinite(vae.val_psnr) and vae.val_psnr >= vae.psnr_floor
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"val_psnr": vae.val_psnr, "floor": vae.psnr_floor, **lineage_metadata(read)},
        description=None if passed else f"PSNR {vae.val_psnr:.2f} dB below the floor {vae.psnr_floor} dB",
    )


@dg.asset_check(
    asset="vae_model",
    blocking=True,
    description="Held-out reconstructions keep every colour (per colour class where the data has one), "
    "their worst decile stays above a PSNR floor, no RGB channel shifts, and what stands out "
    "from the background keeps its colour: failures a mean PSNR hides.",
)
def vae_reconstruction_fidelity(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    read = read_upstream(context, VaeModelRecord)
    vae = read.record
    fidelity = vae.fidelity
    passed, reasons = fidelity_verdict(fidelity, FidelityThresholds.model_validate(vae.fidelity_thresholds))
    classes = fidelity.get("classes") or {}
    foreground = fidelity.get("worst_decile_foreground_shift")
    metadata = {
        "worst_decile_psnr": fidelity["worst_decile_psnr"],
        "channel_shift": dg.MetadataValue.json(fidelity["channel_shift"]),
        **({"worst_decile_foreground_shift": foreground} if foreground is not None else {}),
        **{f"{name}_accuracy": c["accuracy"] for name, c in classes.items()},
        "thresholds": dg.MetadataValue.json(vae.fidelity_thresholds),
        **lineage_metadata(read),
    }
    return dg.AssetCheckResult(passed=passed, metadata=metadata, description="; ".join(reasons) or None)
