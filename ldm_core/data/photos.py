"""Crops of the real photographs shipped inside scikit-image: natural images available offline, used to measure
how well an autoencoder reconstructs photographs (the shapes dataset says little about textures and edges).

`write_photo_crops_source` writes them in the same imagefolder layout as user data (PNG + metadata.jsonl), with
captions like "a photo crop of the astronaut image" and the crop geometry as attributes, so a crop can be
recomputed from the original (`crop_photo`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from PIL import Image

from ldm_core import storage
from ldm_core.data.synthetic import png_bytes

log = logging.getLogger(__name__)

# Colour photographs bundled in the scikit-image wheel itself (no download): astronaut 512², chelsea (a cat)
# 300×451, coffee 400×600, rocket 427×640, hubble_deep_field 872×1000, immunohistochemistry 512².
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def load_photo(name: str) -> np.ndarray:
    """The photograph as uint8 (H, W, 3). Raises if this scikit-image cannot give it offline."""
    import skimage.data  # only the photo sources need scikit-image

    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; choose from {PHOTOS}")
    image = np.asarray(getattr(skimage.data, name)())
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"skimage.data.{name}() is not an RGB uint8 image: {image.dtype} {image.shape}")
    return image


def available_photos(names: tuple[str, ...] = PHOTOS) -> list[str]:
    """The photos of ``names`` that the installed scikit-image provides offline."""
    out = []
    for name in names:
        try:
            load_photo(name)
        except Exception as e:  # ImportError, a missing data file that would need a download, …
            log.info("skimage photo %s unavailable: %s", name, e)
            continue
        out.append(name)
    return out


def crop_photo(photo: np.ndarray, left: int, top: int, crop_size: int, size: int) -> Image.Image:
    """The square ``crop_size`` crop at (left, top), resized to ``size`` (Lanczos): one written crop."""
    crop = Image.fromarray(photo[top : top + crop_size, left : left + crop_size])  # (crop, crop, 3)
    if crop_size != size:
        crop = crop.resize((size, size), Image.Resampling.LANCZOS)
    return crop


def write_photo_crops_source(
    url: str,
    size: int = 64,
    per_image: int = 8,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    photos: tuple[str, ...] = PHOTOS,
) -> list[dict[str, Any]]:
    """Write ``per_image`` random square crops of each available photo, resized to ``size``; return the rows.

    The crop side is drawn between ``size`` and half the photo's shorter side, so crops range from full
    resolution detail to downscaled scenes. Deterministic from ``seed``.
    """
    names = available_photos(photos)
    if not names:
        raise RuntimeError(f"none of the scikit-image photos {photos} is available offline")
    rng = np.random.default_rng(seed)
    storage.makedirs(url, storage_options)
    rows: list[dict[str, Any]] = []
    for name in names:
        photo = load_photo(name)
        h, w = photo.shape[:2]
        largest = max(size, min(h, w) // 2)
        if min(h, w) < size:
            raise ValueError(f"photo {name} ({w}x{h}) is smaller than the crop size {size}")
        for k in range(per_image):
            crop_size = int(rng.integers(size, largest + 1))
            left = int(rng.integers(0, w - crop_size + 1))
            top = int(rng.integers(0, h - crop_size + 1))
            file_name = f"{name}_{k:03d}.png"
            image = crop_photo(photo, left, top, crop_size, size)
            storage.write_bytes_atomic(storage.join(url, file_name), png_bytes(image), storage_options)
            rows.append(
                {
                    "file_name": file_name,
                    "text": f"a photo crop of the {name.replace('_', ' ')} image",
                    "photo": name,
                    "crop_left": left,
                    "crop_top": top,
                    "crop_size": crop_size,
                }
            )
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    storage.write_text_atomic(storage.join(url, "metadata.jsonl"), lines, storage_options)
    return rows
