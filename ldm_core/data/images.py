"""Turning the bytes of one user image into a clean 8-bit RGB image, or a counted reason to drop it.

The rules (each applied one is reported, so nothing is changed silently):

- Decompression bombs: the pixel count is read from the header, before any pixel is decoded, and an image over
  ``max_pixels`` is rejected (``decompression_bomb``). Pillow's own global limit is lifted to ours while we
  decode (see `pixel_limit`) and its bomb warning/error are mapped to the same reason, never a crash.
- Too small: the shorter side (from the header) below ``min_size`` is rejected (``too_small``).
- Bytes that are no image at all (random bytes named ``.png``) are ``not_an_image``; bytes that start like an
  image format but do not decode (a truncated JPEG, a broken PNG) are ``corrupt``.
- EXIF orientation is applied (``converted_exif_orientation``), so width/height are those a viewer shows.
- CMYK, 16-bit, grayscale, palette and alpha images are converted to RGB (``converted_cmyk``, ``converted_16bit``,
  ``converted_grayscale``, ``converted_palette``, ``converted_alpha``; alpha is composited on white). 16-bit
  samples become 8-bit by keeping the high byte (``v >> 8``): the same mapping Pillow itself applies when it
  reads a 16-bit RGB PNG, so a 16-bit gray and a 16-bit colour image of the same content agree.
- The original bytes are kept when they already are a clean, single-frame, 8-bit RGB JPEG/PNG/WebP with no
  orientation to apply; otherwise the cleaned image is re-encoded as PNG (lossless). Other formats (BMP, TIFF,
  GIF) count as ``converted_format``, animations as ``converted_multiframe`` (the first frame is kept).

`CleanImage.sha256` is the SHA-256 of the decoded pixels (see `pixel_sha256`), not of the stored bytes: the
same picture saved twice (different metadata, PNG vs BMP) is one image, and anyone can recompute it by decoding
the stored bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats whose bytes are kept as they are when the image is already clean 8-bit RGB.
KEEPABLE_FORMATS = ("JPEG", "PNG", "WEBP")
# File-name extensions treated as images when scanning a folder (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_EXIF_ORIENTATION = 0x0112
# Leading bytes of the formats above: bytes that start like this but fail to decode are "corrupt", not
# "not_an_image" (the file was an image once, e.g. a truncated upload).
_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


class ImageRejected(Exception):
    """An image that cannot be used; ``reason`` is the counter it is reported under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CleanImage:
    """One image ready for the canonical shards."""

    data: bytes
    """The bytes to store: the original file when it was already clean, else a PNG of the cleaned image."""
    width: int
    height: int
    sha256: str
    """Hex SHA-256 of the decoded RGB pixels and the size (`pixel_sha256`)."""
    conversions: tuple[str, ...] = field(default_factory=tuple)
    """The ``converted_*`` counters this image adds to (empty when nothing was changed)."""

    @property
    def kept_original(self) -> bool:
        return not self.conversions


def pixel_sha256(image: Image.Image) -> str:
    """Hex SHA-256 of an RGB image's size and raw 8-bit pixels (row-major, R G B interleaved)."""
    if image.mode != "RGB":
        raise ValueError(f"pixel_sha256 expects an RGB image, got mode {image.mode}")
    h = hashlib.sha256(f"RGB8 {image.width}x{image.height}\n".encode("ascii"))
    h.update(image.tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Run with Pillow's global bomb limit set to ``max_pixels`` and its warning raised as an error.

    Our own header check in `clean_image` is the primary guard; this keeps Pillow from refusing images we allow
    (its default is ~89 Mpx) and from only *warning* about ones we do not. Not thread-safe (a Pillow global).
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _looks_like_image(data: bytes) -> bool:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return any(data.startswith(m) for m in _MAGIC)


def _png_bit_depth(data: bytes) -> int | None:
    # IHDR is always the first chunk: 8-byte signature, 4-byte length, b"IHDR", width, height, bit depth.
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 24:
        return data[24]
    return None


def _sixteen_to_eight(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit int / float) single-channel image as 8-bit "L", by scaling, never by clipping."""
    a = np.asarray(image)
    if image.mode == "F":
        a = a.astype(np.float64)
        # float images are either in [0, 1] or in [0, 255]; anything else is clipped.
        scale = 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else 1.0
        out = np.clip(np.nan_to_num(a) * scale, 0, 255).round().astype(np.uint8)
    else:
        a = np.clip(a.astype(np.int64), 0, 65535)
        out = (a >> 8).astype(np.uint8)  # 65535 -> 255, 0 -> 0, linear
    return Image.fromarray(out)  # uint8 (H, W) -> "L"


def _to_rgb(image: Image.Image, conversions: list[str]) -> Image.Image:
    """Convert any Pillow mode to RGB, appending the ``converted_*`` counters that apply."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "CMYK":
        conversions.append("converted_cmyk")
        return image.convert("RGB")
    if mode == "P":
        conversions.append("converted_palette")
        if "transparency" in image.info:
            image = image.convert("RGBA")
            mode = "RGBA"
        else:
            return image.convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        conversions.append("converted_16bit")
        conversions.append("converted_grayscale")
        return _sixteen_to_eight(image).convert("RGB")
    if mode in _ALPHA_MODES:
        conversions.append("converted_alpha")
        if mode in ("LA", "La"):
            conversions.append("converted_grayscale")
        rgba = image.convert("RGBA")
        # Composite on white: transparent pixels become the background a viewer on a white page sees.
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _GRAY_MODES:
        conversions.append("converted_grayscale")
        return image.convert("RGB")
    # YCbCr, LAB, HSV, …: Pillow knows how to get RGB out of them.
    conversions.append("converted_colorspace")
    return image.convert("RGB")


def clean_image(data: bytes, *, min_size: int = 8, max_pixels: int = 50_000_000) -> CleanImage:
    """Decode, check and normalise one image. Raises `ImageRejected` with the reason to count."""
    if not data:
        raise ImageRejected("not_an_image", "empty file")
    with pixel_limit(max_pixels):
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRejected("decompression_bomb", str(e)) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageRejected("corrupt" if _looks_like_image(data) else "not_an_image", str(e)) from None

        # 1) checks on the header only: no pixel has been decoded yet
        w, h = image.size
        if w * h > max_pixels:
            raise ImageRejected("decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
        if min(w, h) < min_size:
            raise ImageRejected("too_small", f"{w}x{h} has a side below min_size {min_size}")

        # 2) decode (first frame of an animation)
        try:
            image.load()
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRejected("decompression_bomb", str(e)) from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
            raise ImageRejected("corrupt", str(e)) from None

        conversions: list[str] = []
        fmt = image.format
        multi_frame = getattr(image, "n_frames", 1) > 1
        # 3) orientation, then colour: exif_transpose rotates in any mode
        if orientation not in (1, None):
            try:
                image = ImageOps.exif_transpose(image)
            except Exception as e:  # a malformed EXIF block: decoded pixels are fine, the tag is not
                raise ImageRejected("corrupt", f"bad EXIF orientation: {e}") from None
            conversions.append("converted_exif_orientation")
        if _png_bit_depth(data) == 16 and image.mode not in _SIXTEEN_BIT_MODES:
            # Pillow already reduced 16-bit RGB(A) PNGs to 8 bits (high byte) while decoding.
            conversions.append("converted_16bit")
        rgb = _to_rgb(image, conversions)

    if multi_frame:
        conversions.append("converted_multiframe")  # only the first frame is kept
    if fmt not in KEEPABLE_FORMATS:
        conversions.append("converted_format")  # BMP, TIFF, GIF, …: stored as PNG
    if not conversions:
        stored = data
    else:
        buf = io.BytesIO()
        rgb.save(buf, format="PNG")
        stored = buf.getvalue()
    return CleanImage(
        data=stored,
        width=rgb.width,
        height=rgb.height,
        sha256=pixel_sha256(rgb),
        conversions=tuple(dict.fromkeys(conversions)),  # unique, in order
    )


def decode_rgb(data: bytes) -> Image.Image:
    """Decode stored canonical bytes to an RGB Pillow image (what the dataset and the hash use)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB") if image.mode != "RGB" else image
