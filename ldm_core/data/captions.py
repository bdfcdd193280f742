"""Cleaning one caption: decoding, the policy for missing/empty ones, truncation — each fix reported.

Non-UTF-8 captions are *kept*, decoded with U+FFFD replacement characters, and counted (``caption_non_utf8``):
a caption with one mangled accent still describes its image, and dropping the pair would lose a good image.
Metadata files and sidecar ``.txt`` files are read with ``errors="surrogateescape"`` so that the bytes that were
not UTF-8 survive the parse as lone surrogates; `clean_caption` finds them per caption, replaces them, counts. A
lone surrogate written as a JSON escape (``"\\ud800"``) is no character either (no UTF-8 encodes it, so Parquet
cannot store it): it is replaced and counted the same way. `valid_text` does the same for any other text a row
carries (attribute names and values).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Literal

CaptionPolicy = Literal["drop", "empty", "filename"]

# Lone surrogates: U+DC80..U+DCFF are what surrogateescape makes of undecodable bytes 0x80..0xFF; the rest of
# U+D800..U+DFFF come from JSON escapes. No UTF-8 encodes any of them.
_SURROGATES = re.compile("[\ud800-\udfff]+")
_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class CaptionResult:
    """The caption to store (None: drop the row) and what was done to it."""

    caption: str | None
    drop_reason: str | None = None
    """``missing_caption`` / ``empty_caption`` when the policy is "drop"."""
    fixes: tuple[str, ...] = ()
    """Informational counters: ``caption_non_utf8``, ``caption_truncated``, ``caption_missing_filled``,
    ``caption_empty_filled``."""


def decode_text(data: bytes) -> str:
    """Bytes of a text file as str; a UTF-8 BOM is dropped and non-UTF-8 bytes survive as lone surrogates."""
    return data.decode("utf-8-sig", errors="surrogateescape")


def valid_text(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD: a string that UTF-8 (and so Parquet, JSON) can store."""
    return _SURROGATES.sub(lambda m: _REPLACEMENT * len(m.group()), text)


def caption_from_filename(name: str) -> str:
    """``"red_fox-01.jpg"`` -> ``"red fox 01"``: the stem with separators turned into spaces."""
    stem = posixpath.splitext(posixpath.basename(name))[0]
    return " ".join(re.split(r"[_\-.\s]+", stem)).strip()


def clean_caption(
    raw: str | bytes | None,
    *,
    policy: CaptionPolicy,
    max_chars: int,
    filename: str = "",
) -> CaptionResult:
    """Apply the decoding, missing/empty policy and length limit to one caption."""
    fixes: list[str] = []
    if isinstance(raw, (bytes, bytearray)):
        raw = decode_text(bytes(raw))
    if raw is not None and not isinstance(raw, str):
        raw = str(raw)  # a number or bool in a metadata column
    if raw is not None and _SURROGATES.search(raw):
        raw = valid_text(raw)
        fixes.append("caption_non_utf8")
    text = raw.strip() if raw is not None else None

    if not text:
        kind = "missing" if text is None else "empty"
        if policy == "drop":
            return CaptionResult(None, drop_reason=f"{kind}_caption", fixes=tuple(fixes))
        fixes.append(f"caption_{kind}_filled")
        text = caption_from_filename(filename) if policy == "filename" else ""

    if len(text) > max_chars:
        text = text[:max_chars].rstrip()
        fixes.append("caption_truncated")
    return CaptionResult(text, fixes=tuple(fixes))
