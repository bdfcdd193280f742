"""The embedded default dataset: coloured shapes with captions, generated offline, deterministic from a seed.

Each image is one shape (circle, square, triangle) in one of four well-separated colours, small or large, at one
of nine places on a 3×3 grid, on a light grey background; its caption says all four ("a small red circle in the
top left") and the four are also attribute columns, so a later evaluator can check a generated image against
its prompt. Shapes are at least ~10 px across at 32×32 so colour and shape stay tellable apart.

`write_shapes_source` writes a *source* in the Hugging Face imagefolder layout (PNG files + metadata.jsonl with
``file_name``, ``text`` and the attributes): it goes through exactly the same ingestion path as user data.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ldm_core import storage

SHAPES = ("circle", "square", "triangle")
MIN_SHAPE_SIZE = 16
"""Smallest image side at which a small shape is still recognisable as a circle, square or triangle."""
# Far apart in RGB and in hue, and all clearly darker or more saturated than the background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
# Side of the shape's bounding box as a fraction of the image side: 10 px and 16 px at 32×32.
SIZES: dict[str, float] = {"small": 0.31, "large": 0.5}
# (row, column) on the 3×3 grid, and how a caption says it.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
_PHRASES = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
# Light variation that makes each occurrence of a combination a different image (grey levels × ±1 jitter).
BACKGROUND_LEVELS = tuple(range(224, 252, 2))
JITTERS = (-1, 0, 1)
SUPERSAMPLE = 4  # draw at 4× and box-filter down: anti-aliased edges
COMBINATIONS = tuple(itertools.product(SHAPES, COLORS, SIZES, POSITIONS))
VARIANTS = tuple(itertools.product(BACKGROUND_LEVELS, JITTERS, JITTERS))


def shape_caption(shape: str, color: str, size: str, position: str) -> str:
    """``"a small red circle in the top left"``."""
    return f"a {size} {color} {shape} {_PHRASES[position]}"


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that determines one image."""

    shape: str
    color: str
    size: str
    position: str
    background: int = 240
    """Grey level of the background."""
    dx: int = 0
    """Jitter of the centre, in units of image_side/32 pixels."""
    dy: int = 0

    @property
    def caption(self) -> str:
        return shape_caption(self.shape, self.color, self.size, self.position)

    @property
    def attributes(self) -> dict[str, str]:
        return {"color": self.color, "shape": self.shape, "size": self.size, "position": self.position}


def shape_box(spec: ShapeSpec, image_size: int) -> tuple[float, float, float]:
    """(centre x, centre y, side) of the shape's bounding box, in pixels of the final image."""
    side = SIZES[spec.size] * image_size
    unit = max(1, image_size // 32)
    margin = unit * (1 + max(abs(j) for j in JITTERS))  # jitter never pushes a shape off the image
    row, col = POSITIONS[spec.position]
    lo, hi = margin + side / 2, image_size - margin - side / 2
    cx = lo + (hi - lo) * col / 2 + spec.dx * unit
    cy = lo + (hi - lo) * row / 2 + spec.dy * unit
    return cx, cy, side


def render_shape(spec: ShapeSpec, image_size: int = 32) -> Image.Image:
    """The RGB image of one spec (deterministic: no randomness in here)."""
    s = SUPERSAMPLE
    big = Image.new("RGB", (image_size * s, image_size * s), (spec.background,) * 3)
    draw = ImageDraw.Draw(big)
    cx, cy, side = (v * s for v in shape_box(spec, image_size))
    half = side / 2
    fill = COLORS[spec.color]
    # coordinates are pixel edges at 4×; the -1 keeps the drawn extent equal to `side`
    box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
    if spec.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif spec.shape == "square":
        draw.rectangle(box, fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half - 1), (cx + half - 1, cy + half - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}")
    return big.resize((image_size, image_size), Image.Resampling.BOX)


def shape_specs(n: int, seed: int) -> list[ShapeSpec]:
    """``n`` specs, deterministic from ``seed``, balanced: every block of 216 holds each combination once.

    The k-th occurrence of a combination takes the k-th of its own shuffled variants, so images are distinct
    for n up to 216 × 126 = 27,216 (beyond that, ingestion drops the repeats as duplicates).
    """
    rng = np.random.default_rng(seed)
    variant_orders: dict[int, np.ndarray] = {}
    specs: list[ShapeSpec] = []
    for block in range(math.ceil(n / len(COMBINATIONS))):
        for c in rng.permutation(len(COMBINATIONS)):
            if len(specs) == n:
                break
            if c not in variant_orders:
                variant_orders[c] = np.random.default_rng([seed, int(c)]).permutation(len(VARIANTS))
            background, dx, dy = VARIANTS[variant_orders[c][block % len(VARIANTS)]]
            shape, color, size, position = COMBINATIONS[c]
            specs.append(ShapeSpec(shape, color, size, position, background, dx, dy))
    return specs


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # Pillow writes no timestamp: same pixels -> same bytes
    return buf.getvalue()


def write_shapes_source(
    url: str,
    n: int,
    seed: int = 0,
    size: int = 32,
    storage_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Write ``n`` shape images + ``metadata.jsonl`` under ``url`` (imagefolder layout); return the metadata rows."""
    if size < MIN_SHAPE_SIZE:
        raise ValueError(f"size {size} is too small for the shapes to be told apart (use >= {MIN_SHAPE_SIZE})")
    width = max(6, len(str(max(n - 1, 0))))
    rows: list[dict[str, Any]] = []
    storage.makedirs(url, storage_options)
    for i, spec in enumerate(shape_specs(n, seed)):
        name = f"{i:0{width}d}.png"
        storage.write_bytes_atomic(storage.join(url, name), png_bytes(render_shape(spec, size)), storage_options)
        rows.append({"file_name": name, "text": spec.caption, **spec.attributes})
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    # the index last: a reader that sees it sees every image it names
    storage.write_text_atomic(storage.join(url, "metadata.jsonl"), lines, storage_options)
    return rows
