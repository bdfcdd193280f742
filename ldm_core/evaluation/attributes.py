"""Attribute accuracy on the embedded shapes dataset: does a generated image show what its prompt asked for?

A deterministic evaluator, no learned weights: classical image analysis against the generator's own geometry
(:mod:`ldm_core.data.synthetic`), so its verdicts mean the same thing on every machine and in every run.

1. Background: the median colour of the one-pixel border ring (shapes never touch the border).
2. Foreground: the largest connected blob of pixels far from the background; its median colour is the shape's
   colour, and every pixel gets a coverage ``alpha`` in [0, 1] by projecting it on the background→shape colour
   line, so anti-aliased (or blurred) edges count fractionally.
3. Colour: the palette colour nearest to the blob's median RGB.
4. Shape and size: the coverage map is compared (L1) with the exact coverage of each of the 3 shapes × 2 sizes the
   generator draws, each placed so that its centroid sits on the blob's centroid; the closest template wins.
5. Position: the template's box centre, snapped to the nearest of the 9 grid places for that size.

Its own accuracy on real dataset images is measured by :func:`evaluator_accuracy` (a test holds it at ≥ 98%), so a
low attribute accuracy on generated images is the model's fault, not the evaluator's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ldm_core.data.synthetic import COLORS, POSITIONS, SHAPES, SIZES, ShapeSpec, shape_box
from ldm_core.evaluation.metrics import MetricResult

ATTRIBUTES = ("color", "shape", "size", "position")
# A blob is foreground when its pixels are at least this far (Euclidean RGB, 0–255 scale) from the background.
# The palette's nearest colour to any background grey is yellow at ≈ 190 from grey 240; 40 leaves a wide margin
# for washed-out generated colours while ignoring mild noise.
MIN_CONTRAST = 40.0
# Core pixels are those at least this fraction of the blob's peak contrast away from the background: the fully
# covered interior, whose median is the shape's colour even when the edges are blended.
CORE_FRACTION = 0.5
# Sub-samples per pixel side when computing a template's exact coverage (16 samples per pixel).
TEMPLATE_SUPERSAMPLE = 4

_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float64)  # (K, 3)


@dataclass(frozen=True)
class ShapePrediction:
    """What the evaluator sees in one image (``None`` fields when there is no foreground at all)."""

    color: str | None
    shape: str | None
    size: str | None
    position: str | None
    centroid: tuple[float, float] | None = None
    """(x, y) of the coverage-weighted centroid, in pixels (pixel i spans [i, i+1))."""
    area: float = 0.0
    """Foreground coverage in pixels."""
    template_error: float | None = None
    """Mean absolute coverage difference to the winning template (0 = a perfect match)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Image analysis ------------------------------------------------------------------------------------------------------


def estimate_background(image: np.ndarray) -> np.ndarray:
    """Median RGB of the one-pixel border ring of an (H, W, 3) image: (3,) float."""
    a = np.asarray(image, dtype=np.float64)
    ring = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])  # (2W + 2H − 4, 3)
    return np.median(ring, axis=0)


def foreground(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(alpha (H, W) in [0, 1], shape colour (3,), background (3,)), or None when nothing stands out.

    Only the largest 8-connected blob (and a one-pixel rim around it, for its anti-aliased edge) gets coverage:
    stray specks elsewhere in a generated image do not move the centroid or the area.
    """
    a = np.asarray(image, dtype=np.float64)  # (H, W, 3)
    background = estimate_background(a)
    contrast = np.linalg.norm(a - background, axis=-1)  # (H, W)
    peak = float(contrast.max())
    if peak < MIN_CONTRAST:
        return None
    core = contrast >= max(MIN_CONTRAST, CORE_FRACTION * peak)
    labels, n = ndimage.label(core, structure=np.ones((3, 3), bool))
    sizes = ndimage.sum_labels(core, labels, index=np.arange(1, n + 1))
    blob = labels == (1 + int(np.argmax(sizes)))
    color = np.median(a[blob], axis=0)
    direction = color - background
    # Project each pixel on the background→colour segment: a pixel that is a blend α·colour + (1−α)·background
    # gets exactly α.
    alpha = np.clip((a - background) @ direction / float(direction @ direction), 0.0, 1.0)
    rim = ndimage.binary_dilation(blob, structure=np.ones((3, 3), bool))
    return np.where(rim, alpha, 0.0), color, background


def nearest_color(rgb: np.ndarray) -> str:
    """The palette colour name nearest (Euclidean RGB) to ``rgb``."""
    return _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - np.asarray(rgb, np.float64), axis=1)))]


def template_coverage(shape: str, center: tuple[float, float], side: float, height: int, width: int) -> np.ndarray:
    """Exact-ish (16 samples per pixel) coverage (H, W) of a shape as the generator draws it.

    The shape's bounding box is ``side`` wide, centred on ``center`` = (x, y); the triangle points up with its
    base on the box's bottom edge, as in :func:`ldm_core.data.synthetic.render_shape`.
    """
    s = TEMPLATE_SUPERSAMPLE
    offsets = (np.arange(s) + 0.5) / s
    ys = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1)  # (H·s,) sample centres
    xs = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1)  # (W·s,)
    dx = xs[None, :] - center[0]  # (1, W·s)
    dy = ys[:, None] - center[1]  # (H·s, 1)
    half = side / 2
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":
        depth = dy + half  # distance below the apex
        inside = (depth >= 0) & (depth <= side) & (np.abs(dx) <= depth / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    # (H·s, W·s) -> (H, s, W, s) -> mean over the sub-samples -> (H, W)
    return inside.reshape(height, s, width, s).mean(axis=(1, 3))


def _box_center_from_centroid(shape: str, centroid: tuple[float, float], side: float) -> tuple[float, float]:
    # A triangle's centroid lies two thirds of the way down from its apex, i.e. side/6 below its box's centre.
    return (centroid[0], centroid[1] - side / 6) if shape == "triangle" else centroid


def _position_anchors(size: str, image_side: int) -> dict[str, tuple[float, float]]:
    """Box centres of the 9 grid places for ``size`` (no jitter), from the generator's own layout."""
    anchors = {}
    for position in POSITIONS:
        cx, cy, _ = shape_box(ShapeSpec("square", _PALETTE_NAMES[0], size, position), image_side)
        anchors[position] = (cx, cy)
    return anchors


def predict_attributes(image: np.ndarray) -> ShapePrediction:
    """Colour, shape, size and grid position of the one shape in an (H, W, 3) uint8 image."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected one (H, W, 3) image, got shape {image.shape}")
    height, width = image.shape[:2]
    found = foreground(image)
    if found is None:
        return ShapePrediction(None, None, None, None)
    alpha, color, _ = found
    area = float(alpha.sum())
    ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
    centroid = (float((alpha * xs).sum() / area), float((alpha * ys).sum() / area))
    image_side = min(height, width)  # the generator draws on square images; this keeps other sizes usable

    best: tuple[float, str, str, tuple[float, float]] | None = None
    for size, fraction in SIZES.items():
        side = fraction * image_side
        for shape in SHAPES:
            center = _box_center_from_centroid(shape, centroid, side)
            error = float(np.abs(alpha - template_coverage(shape, center, side, height, width)).mean())
            if best is None or error < best[0]:
                best = (error, shape, size, center)
    error, shape, size, center = best
    anchors = _position_anchors(size, image_side)
    position = min(anchors, key=lambda p: (anchors[p][0] - center[0]) ** 2 + (anchors[p][1] - center[1]) ** 2)
    return ShapePrediction(nearest_color(color), shape, size, position, centroid, area, error)


# Captions ------------------------------------------------------------------------------------------------------------

_POSITION_PHRASES = {
    "in the top left": "top left",
    "at the top": "top",
    "in the top right": "top right",
    "on the left": "left",
    "in the center": "center",
    "on the right": "right",
    "in the bottom left": "bottom left",
    "at the bottom": "bottom",
    "in the bottom right": "bottom right",
}
_CAPTION_RE = re.compile(
    rf"^a (?P<size>{'|'.join(SIZES)}) (?P<color>{'|'.join(COLORS)}) (?P<shape>{'|'.join(SHAPES)}) "
    rf"(?P<where>{'|'.join(_POSITION_PHRASES)})$"
)


def parse_caption(caption: str) -> dict[str, str]:
    """The attributes a shapes-dataset caption names (``"a small red circle in the top left"``).

    Raises ValueError for a caption outside the dataset's grammar: its attributes cannot be checked.
    """
    m = _CAPTION_RE.match(caption.strip().lower())
    if m is None:
        raise ValueError(f"not a shapes-dataset caption: {caption!r}")
    return {"color": m["color"], "shape": m["shape"], "size": m["size"], "position": _POSITION_PHRASES[m["where"]]}


# Accuracy ------------------------------------------------------------------------------------------------------------


def attribute_accuracy(
    images: np.ndarray | Sequence[np.ndarray],
    prompts_attributes: Sequence[Mapping[str, str] | str],
) -> dict[str, Any]:
    """How often the evaluator sees in each image the attributes its prompt asked for.

    ``images``: (N, H, W, 3) uint8; ``prompts_attributes``: per image, a mapping with any of color / shape / size /
    position (extra keys are ignored), or a dataset caption. Returns ``color_acc``, ``shape_acc``, ``size_acc``,
    ``position_acc`` (None when no prompt names that attribute), ``n`` (images) and ``n_<attribute>`` (prompts
    that named it), plus ``predictions`` (one dict per image, for reports and debugging).
    """
    if len(images) != len(prompts_attributes):
        raise ValueError(f"{len(images)} images but {len(prompts_attributes)} prompts")
    hits = {a: 0 for a in ATTRIBUTES}
    counts = {a: 0 for a in ATTRIBUTES}
    predictions = []
    for image, wanted in zip(images, prompts_attributes):
        wanted = parse_caption(wanted) if isinstance(wanted, str) else wanted
        predicted = predict_attributes(image)
        predictions.append(predicted.to_dict())
        for a in ATTRIBUTES:
            if wanted.get(a) is not None:
                counts[a] += 1
                hits[a] += int(getattr(predicted, a) == wanted[a])
    out: dict[str, Any] = {f"{a}_acc": (hits[a] / counts[a] if counts[a] else None) for a in ATTRIBUTES}
    out["n"] = len(predictions)
    out.update({f"n_{a}": counts[a] for a in ATTRIBUTES})
    out["predictions"] = predictions
    return out


def evaluator_accuracy(
    images: np.ndarray | Sequence[np.ndarray],
    attributes: Sequence[Mapping[str, str]],
) -> dict[str, Any]:
    """The evaluator's own accuracy on REAL images with known ``attributes`` (the dataset's attribute columns).

    Same numbers as :func:`attribute_accuracy`, plus ``errors``: (index, attribute, truth, predicted) for every
    miss, so a regression in the evaluator is diagnosable.
    """
    result = attribute_accuracy(images, attributes)
    result["errors"] = [
        (i, a, truth[a], pred[a])
        for i, (truth, pred) in enumerate(zip(attributes, result["predictions"]))
        for a in ATTRIBUTES
        if truth.get(a) is not None and pred[a] != truth[a]
    ]
    return result


def color_confusion(
    prompts_attributes: Sequence[Mapping[str, str] | str], predictions: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, int]]:
    """Asked-for colour → colour the evaluator saw → count ("none": no shape found), from :func:`attribute_accuracy`'s
    ``predictions``; a model that paints red prompts yellow shows up as ``{"red": {"yellow": 54}}``."""
    table: dict[str, dict[str, int]] = {}
    for wanted, predicted in zip(prompts_attributes, predictions):
        wanted = parse_caption(wanted) if isinstance(wanted, str) else wanted
        if wanted.get("color") is None:
            continue
        row = table.setdefault(wanted["color"], {})
        seen = predicted.get("color") or "none"
        row[seen] = row.get(seen, 0) + 1
    return {c: dict(sorted(row.items())) for c, row in sorted(table.items())}


def confusion_lines(confusion: Mapping[str, Mapping[str, int]]) -> list[str]:
    """The misreadings of a confusion table, worst first: ["red → yellow: 54 of 54", …]."""
    rows = []
    for wanted, row in confusion.items():
        total = sum(row.values())
        rows += [(k / total, f"{wanted} → {seen}: {k} of {total}") for seen, k in row.items() if seen != wanted and k]
    return [text for _, text in sorted(rows, key=lambda r: -r[0])]


def accuracy_metrics(accuracy: Mapping[str, Any]) -> dict[str, MetricResult]:
    """The four accuracies of :func:`attribute_accuracy` as metric results (``color_acc`` …) with their sample sizes;
    an attribute that no prompt named is "not computed"."""
    out = {}
    for a in ATTRIBUTES:
        n = int(accuracy[f"n_{a}"])
        value = accuracy[f"{a}_acc"]
        out[f"{a}_acc"] = (
            MetricResult(f"{a}_acc", float(value), n, note="deterministic shapes evaluator")
            if value is not None
            else MetricResult.not_computed(f"{a}_acc", f"no prompt names a {a}")
        )
    return out


__all__ = [
    "ATTRIBUTES",
    "accuracy_metrics",
    "ShapePrediction",
    "color_confusion",
    "confusion_lines",
    "attribute_accuracy",
    "estimate_background",
    "evaluator_accuracy",
    "foreground",
    "nearest_color",
    "parse_caption",
    "predict_attributes",
    "template_coverage",
]
