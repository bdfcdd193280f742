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
4. Foreground shift (any data, no labels needed): signals 2 and 3 average the lost colour with everything that was
   reconstructed well (the background most of all), so a decoder that paints every red shape yellow passes their
   library defaults. Per image, the foreground is the pixels that differ from the image's own background (the
   median of its border ring, as the attribute evaluator finds it). Of each foreground pixel's change, only the part
   off the line from its original colour to the background counts: blending with the background (a blurry or
   soft-edged decoder) moves a pixel along that line, a hue decoded as another moves it off. The image's shift is
   the RGB length of the per-channel median of that part over its foreground; the signal is the mean shift of the
   10% of images with a foreground that shift most, which a lost colour fills.

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
from ldm_core.evaluation.attributes import (
    MIN_CONTRAST,
    confusion_lines,
    estimate_background,
    foreground,
    nearest_color,
)
from ldm_core.evaluation.metrics import psnr_per_image
from ldm_core.grids import to_uint8

WORST_FRACTION = 0.1
"""The share of images (the worst-reconstructed) whose mean PSNR (and foreground shift) is the worst-decile signal."""
MIN_FOREGROUND_SHARE = 0.01
"""An image whose foreground (pixels at least ``MIN_CONTRAST`` from its background) is a smaller share of its pixels
has nothing that could lose a colour: it is left out of the foreground shift."""


class FidelityThresholds(StrictModel):
    """What a reconstruction must reach to pass the autoencoder's fidelity check (None switches a bound off)."""

    min_class_accuracy: float | None = Field(0.9, ge=0, le=1)
    """Per colour class: the share of its images whose reconstruction still shows that colour."""
    worst_decile_psnr: float | None = 12.0
    """Floor (dB) of the mean PSNR of the 10% worst-reconstructed images."""
    max_channel_shift: float | None = Field(8.0, ge=0)
    """Bound (0–255 levels) on each RGB channel's mean shift between originals and reconstructions."""
    max_foreground_shift: float | None = Field(40.0, ge=0)
    """Bound (0–255 levels, RGB length) on the worst-decile foreground shift: how far the colour of what stands out
    from the background moved off its line to the background. A hue decoded as another moves it; blur does not;
    a trained autoencoder's small hue errors do, by less than half this (README, "The demo's recipe")."""


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
    foreground_images: int = 0
    """Images with a foreground (see ``MIN_FOREGROUND_SHARE``): the ones the foreground shift is measured on."""
    worst_decile_foreground_shift: float | None = None
    """Mean foreground shift (0–255 levels, RGB length; see `foreground_shift`) of the ceil(10%) of foreground images
    that shift most; None when no image has a foreground."""
    worst_decile_foreground_channels: tuple[float, float, float] | None = None
    """The same images' mean signed foreground shift per RGB channel: which way the colour went."""

    @property
    def max_channel_shift(self) -> float:
        return max(abs(v) for v in self.channel_shift)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def confusions(self) -> list[str]:
        """The misreadings, worst first: ["red → yellow: 28 of 28", …]."""
        return confusion_lines({name: c.confusion for name, c in (self.classes or {}).items()})


def reconstruction_fidelity(
    originals: np.ndarray, reconstructions: np.ndarray, colours: Sequence[str] | None = None
) -> ReconstructionFidelity:
    """Measure originals vs reconstructions, both uint8 (N, H, W, 3); ``colours``: the true colour of each image."""
    originals, reconstructions = np.asarray(originals), np.asarray(reconstructions)
    if originals.shape != reconstructions.shape or originals.ndim != 4 or len(originals) == 0:
        raise ValueError(
            f"need two equal non-empty (N, H, W, 3) image sets, got {originals.shape} and {reconstructions.shape}"
        )
    if colours is not None and len(colours) != len(originals):
        raise ValueError(f"{len(colours)} colours for {len(originals)} images")
    per_image = psnr_per_image(originals, reconstructions)  # (N,)
    k = max(1, int(np.ceil(WORST_FRACTION * len(per_image))))
    worst = torch.sort(per_image).values[:k]
    diff = reconstructions.astype(np.float64) - originals.astype(np.float64)  # (N, H, W, 3)
    shift = tuple(float(v) for v in diff.mean(axis=(0, 1, 2)))
    classes = _per_class(originals, reconstructions, colours) if colours is not None else None
    fg_shift = foreground_shift(originals, reconstructions)  # (N, 3), NaN rows: no foreground
    has_fg = ~np.isnan(fg_shift[:, 0])
    worst_fg = worst_channels = None
    if has_fg.any():
        shifts = fg_shift[has_fg]  # (M, 3)
        lengths = np.linalg.norm(shifts, axis=1)  # (M,)
        top = np.argsort(-lengths, kind="stable")[: max(1, int(np.ceil(WORST_FRACTION * len(lengths))))]
        worst_fg = float(lengths[top].mean())
        worst_channels = tuple(float(v) for v in shifts[top].mean(axis=0))
    return ReconstructionFidelity(
        len(originals),
        float(per_image.mean()),
        float(worst.mean()),
        shift,
        classes,
        int(has_fg.sum()),
        worst_fg,
        worst_channels,
    )


def foreground_shift(originals: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """(N, 3) float: per image, the per-channel median over the original's foreground of the part of
    (reconstruction − original) off the line from the pixel's colour to the image's background, in 0–255 levels;
    a row of NaN for an image without foreground (see ``MIN_FOREGROUND_SHARE``)."""
    out = np.full((len(originals), 3), np.nan)
    for i, (original, recon) in enumerate(zip(originals, reconstructions)):
        a = original.astype(np.float64)  # (H, W, 3)
        to_background = estimate_background(a) - a  # (H, W, 3)
        distance = np.linalg.norm(to_background, axis=-1)  # (H, W)
        mask = distance >= MIN_CONTRAST
        if mask.mean() >= MIN_FOREGROUND_SHARE:
            d = recon.astype(np.float64)[mask] - a[mask]  # (n_fg, 3)
            u = to_background[mask] / distance[mask, None]  # (n_fg, 3) unit vectors toward the background
            # what blending with the background (blur, a soft edge) cannot do: leave that line
            off_line = d - (d * u).sum(axis=1, keepdims=True) * u  # (n_fg, 3)
            out[i] = np.median(off_line, axis=0)
    return out


@torch.inference_mode()
def autoencoder_fidelity(
    model: torch.nn.Module, dataset: Any, max_items: int = 256, batch_size: int = 32, device: str | torch.device = "cpu"
) -> ReconstructionFidelity:
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


def _per_class(originals: np.ndarray, reconstructions: np.ndarray, colours: Sequence[str]) -> dict[str, ClassFidelity]:
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
        out[true] = ClassFidelity(
            n, seen[true].get(true, 0) / n, dict(sorted(seen[true].items())), float(np.mean(err)) if err else None
        )
    return out


def fidelity_verdict(
    fidelity: ReconstructionFidelity | Mapping[str, Any], thresholds: FidelityThresholds
) -> tuple[bool, list[str]]:
    """(passed, one reason per bound that failed). Takes the measurement or its ``to_dict()`` (asset metadata)."""
    f = fidelity.to_dict() if isinstance(fidelity, ReconstructionFidelity) else dict(fidelity)
    reasons = []
    if thresholds.min_class_accuracy is not None:
        for name, c in (f.get("classes") or {}).items():
            if c["accuracy"] < thresholds.min_class_accuracy:
                wrong = {k: v for k, v in c["confusion"].items() if k != name and v}
                where = ", ".join(f"{name} → {k}: {v}" for k, v in sorted(wrong.items(), key=lambda kv: -kv[1]))
                reasons.append(
                    f"{name} reconstructed as {name} in {c['accuracy']:.0%} of {c['n']} images "
                    f"(< {thresholds.min_class_accuracy:.0%}; {where})"
                )
    if thresholds.worst_decile_psnr is not None and not f["worst_decile_psnr"] >= thresholds.worst_decile_psnr:
        reasons.append(f"worst-decile PSNR {f['worst_decile_psnr']:.2f} dB below {thresholds.worst_decile_psnr} dB")
    if thresholds.max_channel_shift is not None:
        for channel, v in zip("RGB", f["channel_shift"]):
            if not abs(v) <= thresholds.max_channel_shift:
                reasons.append(f"channel {channel} shifted by {v:+.1f} levels (bound ±{thresholds.max_channel_shift})")
    bound, fg = thresholds.max_foreground_shift, f.get("worst_decile_foreground_shift")
    if bound is not None and fg is not None and not fg <= bound:
        channels = ", ".join(f"{c} {v:+.0f}" for c, v in zip("RGB", f["worst_decile_foreground_channels"]))
        reasons.append(
            f"foreground colour shifted by {fg:.1f} levels in the worst {WORST_FRACTION:.0%} of "
            f"{f['foreground_images']} images ({channels}; bound {bound})"
        )
    return not reasons, reasons


__all__ = [
    "ClassFidelity",
    "FidelityThresholds",
    "MIN_FOREGROUND_SHARE",
    "ReconstructionFidelity",
    "WORST_FRACTION",
    "autoencoder_fidelity",
    "fidelity_verdict",
    "foreground_shift",
    "reconstruction_fidelity",
]
