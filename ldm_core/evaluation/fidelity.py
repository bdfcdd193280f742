"""Reconstruction fidelity of a trained autoencoder, measured where a mean PSNR hides failures.

A mean PSNR averages over pixels and images, so an autoencoder that decodes one colour as another can keep a high
PSNR: the wrong pixels are a small share of each image, and the images with that colour are a share of the set
(README, "The demo's recipe", has the run where it happened). Three signals see it:

1. Per class (data with a colour attribute, like the embedded shapes): the evaluator's colour of each
   reconstruction (:func:`ldm_core.evaluation.attributes.predict_attributes`' colour rule) against the image's true
   colour, as an accuracy per colour and a confusion table ("red → yellow: 28 of 28").
2. Worst decile (any data): the mean PSNR of the 10% worst-reconstructed images. A colour that is lost takes all of
   its images into that decile.
3. Channel shift (any data): per RGB channel, the mean over images of (reconstruction − original), in 0–255 levels.
   A hue that is decoded as another moves the channel that tells them apart.

:func:`fidelity_verdict` turns the measurement into pass/fail against :class:`FidelityThresholds`; the ``vae_model``
asset check uses both, and blocks everything downstream of an autoencoder that fails.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from pydantic import Field

from ldm_core.config import StrictModel
from ldm_core.evaluation.attributes import confusion_lines, foreground, nearest_color
from ldm_core.evaluation.metrics import psnr_per_image
from ldm_core.grids import to_uint8

WORST_FRACTION = 0.1
"""The share of images (the worst-reconstructed) whose mean PSNR is the worst-decile signal."""


class FidelityThresholds(StrictModel):
    """What a reconstruction must reach to pass the autoencoder's fidelity check (None switches a bound off)."""

    min_class_accuracy: float | None = Field(0.9, ge=0, le=1)
    """Per colour class: the share of its images whose reconstruction still shows that colour."""
    worst_decile_psnr: float | None = 12.0
    """Floor (dB) of the mean PSNR of the 10% worst-reconstructed images."""
    max_channel_shift: float | None = Field(8.0, ge=0)
    """Bound (0–255 levels) on each RGB channel's mean shift between originals and reconstructions."""


@dataclass(frozen=True)
class ClassFidelity:
    """One colour class."""

    n: int
    accuracy: float
    """Share of this class's reconstructions whose colour is still this class's."""
    confusion: dict[str, int]
    """Colour seen in the reconstruction → how many of this class's images ("none": no shape found)."""
    colour_error: float | None
    """Mean RGB distance (0–255) between the shape colour of original and reconstruction, over images with both."""


@dataclass(frozen=True)
class ReconstructionFidelity:
    n: int
    psnr: float
    """Mean PSNR (dB) over images."""
    worst_decile_psnr: float
    """Mean PSNR (dB) of the ceil(10%) worst images."""
    channel_shift: tuple[float, float, float]
    """Mean over images of (reconstruction − original) per RGB channel, in 0–255 levels."""
    classes: dict[str, ClassFidelity] | None = None
    """Per colour class, when the images came with a colour each."""

    @property
    def max_channel_shift(self) -> float:
        return max(abs(v) for v in self.channel_shift)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def confusions(self) -> list[str]:
        """The misreadings, worst first: ["red → yellow: 28 of 28", …]."""
        return confusion_lines({name: c.confusion for name, c in (self.classes or {}).items()})


def reconstruction_fidelity(originals: np.ndarray, reconstructions: np.ndarray,
                            colours: Sequence[str] | None = None) -> ReconstructionFidelity:
    """Measure originals vs reconstructions, both uint8 (N, H, W, 3); ``colours``: the true colour of each image."""
    originals, reconstructions = np.asarray(originals), np.asarray(reconstructions)
    if originals.shape != reconstructions.shape or originals.ndim != 4 or len(originals) == 0:
        raise ValueError(f"need two equal non-empty (N, H, W, 3) image sets, got {originals.shape} and "
                         f"{reconstructions.shape}")
    if colours is not None and len(colours) != len(originals):
        raise ValueError(f"{len(colours)} colours for {len(originals)} images")
    per_image = psnr_per_image(originals, reconstructions)  # (N,)
    k = max(1, int(np.ceil(WORST_FRACTION * len(per_image))))
    worst = torch.sort(per_image).values[:k]
    diff = reconstructions.astype(np.float64) - originals.astype(np.float64)  # (N, H, W, 3)
    shift = tuple(float(v) for v in diff.mean(axis=(0, 1, 2)))
    classes = _per_class(originals, reconstructions, colours) if colours is not None else None
    return ReconstructionFidelity(len(originals), float(per_image.mean()), float(worst.mean()), shift, classes)


@torch.inference_mode()
def autoencoder_fidelity(model: torch.nn.Module, dataset: Any, max_items: int = 256, batch_size: int = 32,
                         device: str | torch.device = "cpu") -> ReconstructionFidelity:
    """Reconstruct the first ``max_items`` rows of an image dataset (``get_batch`` → (B, 3, H, W) in [−1, 1]) through
    the posterior mean and measure them; rows with a ``color`` attribute (the embedded shapes) are judged per colour."""
    model = model.to(device).eval()
    n = min(len(dataset), max_items)
    if n == 0:
        raise ValueError("no images to measure the reconstruction fidelity on")
    originals, reconstructions = [], []
    for start in range(0, n, batch_size):
        x = dataset.get_batch(list(range(start, min(n, start + batch_size)))).to(device)  # (b, 3, H, W)
        originals.append(to_uint8(x))
        reconstructions.append(to_uint8(model.decode_latents(model.encode_latents(x))))
    colours = None
    if "color" in getattr(dataset, "attribute_names", []):
        rows = dataset.rows(list(range(n)))
        if all(r.get("color") for r in rows):
            colours = [r["color"] for r in rows]
    return reconstruction_fidelity(np.concatenate(originals), np.concatenate(reconstructions), colours)


def _per_class(originals: np.ndarray, reconstructions: np.ndarray,
               colours: Sequence[str]) -> dict[str, ClassFidelity]:
    seen: dict[str, dict[str, int]] = {}
    errors: dict[str, list[float]] = {}
    for original, recon, true in zip(originals, reconstructions, colours):
        found, truth = foreground(recon), foreground(original)
        name = nearest_color(found[1]) if found is not None else "none"
        seen.setdefault(true, {}).setdefault(name, 0)
        seen[true][name] += 1
        if found is not None and truth is not None:
            errors.setdefault(true, []).append(float(np.linalg.norm(found[1] - truth[1])))
    out = {}
    for true in sorted(seen):
        n = sum(seen[true].values())
        err = errors.get(true)
        out[true] = ClassFidelity(n, seen[true].get(true, 0) / n, dict(sorted(seen[true].items())),
                                  float(np.mean(err)) if err else None)
    return out


def fidelity_verdict(fidelity: ReconstructionFidelity | Mapping[str, Any],
                     thresholds: FidelityThresholds) -> tuple[bool, list[str]]:
    """(passed, one reason per bound that failed). Takes the measurement or its ``to_dict()`` (asset metadata)."""
    f = fidelity.to_dict() if isinstance(fidelity, ReconstructionFidelity) else dict(fidelity)
    reasons = []
    if thresholds.min_class_accuracy is not None:
        for name, c in (f.get("classes") or {}).items():
            if c["accuracy"] < thresholds.min_class_accuracy:
                wrong = {k: v for k, v in c["confusion"].items() if k != name and v}
                where = ", ".join(f"{name} → {k}: {v}" for k, v in sorted(wrong.items(), key=lambda kv: -kv[1]))
                reasons.append(f"{name} reconstructed as {name} in {c['accuracy']:.0%} of {c['n']} images "
                               f"(< {thresholds.min_class_accuracy:.0%}; {where})")
    if thresholds.worst_decile_psnr is not None and not f["worst_decile_psnr"] >= thresholds.worst_decile_psnr:
        reasons.append(f"worst-decile PSNR {f['worst_decile_psnr']:.2f} dB below {thresholds.worst_decile_psnr} dB")
    if thresholds.max_channel_shift is not None:
        for channel, v in zip("RGB", f["channel_shift"]):
            if not abs(v) <= thresholds.max_channel_shift:
                reasons.append(f"channel {channel} shifted by {v:+.1f} levels (bound ±{thresholds.max_channel_shift})")
    return not reasons, reasons


__all__ = [
    "ClassFidelity",
    "FidelityThresholds",
    "ReconstructionFidelity",
    "WORST_FRACTION",
    "autoencoder_fidelity",
    "fidelity_verdict",
    "reconstruction_fidelity",
]
