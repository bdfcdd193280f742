"""Image-quality metrics with their sample sizes, and an explicit "not computed, because …" when they cannot be had.

Every metric is a :class:`MetricResult`: a value (or None), how many images it was computed on, and — when it was not
computed — why (e.g. the exact pretrained file that is missing). A missing metric is never replaced by a stand-in.

Images are uint8 (N, H, W, 3) arrays (what :func:`ldm_core.generation.generate` and the datasets give), or floats in
[0, 1] of the same layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ldm_core.pretrained import MissingPretrainedWeights

# PSNR of identical images is +inf; it is reported as this many dB, with `capped` set, so that JSON stays valid and
# averages stay finite. 100 dB is far above anything a lossy autoencoder reaches (LDM's kl-f8: about 24 dB on
# ImageNet, as CompVis/latent-diffusion reports it).
PSNR_CAP_DB = 100.0

# Direction of each metric known to the pipeline: True when higher is better. The gate and the report use it.
HIGHER_IS_BETTER: dict[str, bool] = {
    "psnr": True,
    "ssim": True,
    "lpips": False,
    "rfid": False,
    "fid": False,
    "color_acc": True,
    "shape_acc": True,
    "size_acc": True,
    "position_acc": True,
}


@dataclass(frozen=True)
class MetricResult:
    """One metric's outcome."""

    name: str
    value: float | None
    """The value, or None when not computed."""
    n: int
    """Sample size: images (or image pairs) the value was computed on (0 when not computed)."""
    computed: bool = True
    reason: str | None = None
    """Why it was not computed (None when it was)."""
    capped: bool = False
    """True when the value was clipped (PSNR of identical images is reported as PSNR_CAP_DB)."""
    note: str | None = None
    """Anything a reader must know to interpret the value (e.g. the feature layer of an FID)."""

    def __post_init__(self) -> None:
        if self.computed and (self.value is None or not math.isfinite(self.value)):
            raise ValueError(f"metric {self.name}: a computed metric needs a finite value, got {self.value}")
        if not self.computed and (self.value is not None or not self.reason):
            raise ValueError(f"metric {self.name}: a metric not computed has no value and must say why")

    @classmethod
    def not_computed(cls, name: str, reason: str, n: int = 0) -> MetricResult:
        return cls(name=name, value=None, n=n, computed=False, reason=reason)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetricResult:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def metric_value(m: MetricResult | Mapping[str, Any] | float | int | None) -> float | None:
    """The value of a metric in any of its forms (result, its dict from metrics.json, a bare number), or None."""
    if m is None:
        return None
    if isinstance(m, MetricResult):
        return m.value if m.computed else None
    if isinstance(m, Mapping):
        return float(m["value"]) if m.get("computed", True) and m.get("value") is not None else None
    return float(m)


# Inputs ---------------------------------------------------------------------------------------------------------------


def as_unit_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8, or float in [0, 1] → float64 (N, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images as (N, H, W, 3), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.double() / 255.0
    elif x.is_floating_point():
        x = x.double()
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            # the model convention is [-1, 1]: refusing here catches a forgotten conversion, which would
            # otherwise quietly halve every PSNR's data range
            raise ValueError(f"float images must lie in [0, 1], got [{lo:.3g}, {hi:.3g}] (convert [-1, 1] first)")
    else:
        raise ValueError(f"images must be uint8 or float, got {x.dtype}")
    return x.permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)


def _check_pairs(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"image sets differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


# Metrics -------------------------------------------------------------------------------------------------------------


def psnr_per_image(reference: np.ndarray | torch.Tensor, test: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N,) float64: 10·log10(1 / MSE) of each image pair on the [0, 1] scale, identical pairs at PSNR_CAP_DB."""
    a, b = as_unit_tensor(reference), as_unit_tensor(test)
    _check_pairs(a, b)
    mse = ((a - b) ** 2).flatten(1).mean(dim=1)  # (N,)
    return torch.where(
        mse == 0,
        torch.full_like(mse, PSNR_CAP_DB),
        (10 * torch.log10(1.0 / mse.clamp_min(1e-300))).clamp_max(PSNR_CAP_DB),
    )


def psnr(reference: np.ndarray | torch.Tensor, test: np.ndarray | torch.Tensor) -> MetricResult:
    """Mean over images of 10·log10(1 / MSE) on the [0, 1] scale (per-image, as reconstruction papers report it).

    An identical pair has infinite PSNR: it contributes :data:`PSNR_CAP_DB` and the result is flagged ``capped``.
    """
    per_image = psnr_per_image(reference, test)
    if len(per_image) == 0:
        return MetricResult.not_computed("psnr", "no images")
    n_capped = int((per_image >= PSNR_CAP_DB).sum())
    note = f"{n_capped} identical pair(s) counted as {PSNR_CAP_DB:g} dB" if n_capped else None
    return MetricResult("psnr", float(per_image.mean()), len(per_image), capped=n_capped > 0, note=note)


def ssim(reference: np.ndarray | torch.Tensor, test: np.ndarray | torch.Tensor) -> MetricResult:
    """Mean SSIM (Wang et al. 2004: 11×11 Gaussian window, σ = 1.5, data range 1) over images; identical → 1."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = as_unit_tensor(reference), as_unit_tensor(test)
    _check_pairs(a, b)
    if len(a) == 0:
        return MetricResult.not_computed("ssim", "no images")
    if min(a.shape[-2:]) < 11:
        return MetricResult.not_computed("ssim", f"images of {tuple(a.shape[-2:])} are smaller than the 11×11 window")
    per_image = structural_similarity_index_measure(b, a, data_range=1.0, reduction="none")  # (N,)
    return MetricResult("ssim", float(per_image.mean()), len(a))


def lpips(
    reference: np.ndarray | torch.Tensor,
    test: np.ndarray | torch.Tensor,
    *,
    model: torch.nn.Module | None = None,
    download: bool = True,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> MetricResult:
    """Mean LPIPS-VGG distance (lower is better). Not computed — with the missing file named — when the VGG16 or
    LPIPS weights are absent; ``model`` reuses an LPIPS already built with
    :func:`ldm_core.losses.perceptual.build_lpips`.
    """
    a, b = as_unit_tensor(reference), as_unit_tensor(test)
    _check_pairs(a, b)
    if len(a) == 0:
        return MetricResult.not_computed("lpips", "no images")
    if model is None:
        from ldm_core.losses.perceptual import build_lpips

        try:
            model = build_lpips(download=download)
        except MissingPretrainedWeights as e:
            return MetricResult.not_computed("lpips", str(e))
    model = model.to(device).eval()
    distances = []
    with torch.inference_mode():
        for start in range(0, len(a), batch_size):
            # LPIPS takes [-1, 1]; (b, 3, H, W) -> (b, 1, 1, 1)
            x = (a[start : start + batch_size].float() * 2 - 1).to(device)
            y = (b[start : start + batch_size].float() * 2 - 1).to(device)
            distances.append(model(x, y).flatten().double().cpu())
    return MetricResult("lpips", float(torch.cat(distances).mean()), len(a))


__all__ = [
    "HIGHER_IS_BETTER",
    "MetricResult",
    "PSNR_CAP_DB",
    "as_unit_tensor",
    "lpips",
    "metric_value",
    "psnr",
    "psnr_per_image",
    "ssim",
]
