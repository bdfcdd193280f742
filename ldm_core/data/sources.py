"""Reading user image–caption data in the layouts the ecosystem already uses, from any fsspec URL.

Two layouts, auto-detected (`detect_layout`) or forced:

- ``imagefolder`` — image files under a folder (any depth). Captions come from a ``metadata.jsonl`` or
  ``metadata.csv`` (the Hugging Face imagefolder convention: a ``file_name`` column relative to the metadata
  file's folder, a ``text`` column; every other column is an attribute carried through), else from a sidecar
  text file next to the image (``img.png`` + ``img.txt``). A metadata row naming a file that does not exist is
  reported as a ``missing_image`` record.
- ``parquet`` — Parquet shards in the Hugging Face datasets layout: an image column of ``{bytes, path}`` structs
  or raw binary, a caption column (``text``, ``caption``, ``prompt``, … see `CAPTION_COLUMN_NAMES`), every
  other scalar column an attribute. Read in small record batches, so a large shard never sits in memory whole.

A source is a list of `SourceEntry` (a file, with the size and ETag that tell whether it changed) and, per entry,
the `RawRecord` rows it holds: an image folder entry is one image, a Parquet entry is a whole shard.
Nothing here decodes images or judges captions: that is `images` and `captions`.

Input that cannot hurt: every path a source names (a metadata ``file_name``, a Parquet ``image.path``) stays under
the source — an absolute path, a ``..`` that climbs out of it or a URL is refused (``path_outside_source``), so an
``s3://`` source never reads a local file. Every read is bounded (`ReadLimits`): an image over ``max_image_bytes``
is ``too_large`` (read no further than the limit, so even ``/dev/zero`` costs no more), a sidecar caption over
`MAX_SIDECAR_BYTES` is ``caption_too_large``, and a metadata file over ``max_metadata_bytes`` refuses the source
with one line naming it. Text that UTF-8 cannot encode (lone surrogates) is replaced, never passed on to Parquet.
"""

from __future__ import annotations

import abc
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from ldm_core import storage
from ldm_core.data.captions import decode_text, valid_text
from ldm_core.data.images import IMAGE_EXTENSIONS
from ldm_core.storage import TooLarge, contained_path, redact_url

log = logging.getLogger(__name__)

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")  # jsonl wins when a folder has both
CAPTION_COLUMN_NAMES = ("text", "caption", "prompt", "captions", "sentence", "alt_text", "description")
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes", "bytes")
SIDECAR_EXTENSION = ".txt"
# Python types an attribute value may have in the canonical shards; anything else is stored as JSON text.
_SCALARS = (bool, int, float, str)
# An integer attribute beyond int64 (Parquet's widest integer) is stored as its text.
_INT64 = (-(2**63), 2**63 - 1)

MAX_IMAGE_BYTES = 64 * 2**20
"""Default byte limit of one image file (or one image value of a Parquet row): larger ones are ``too_large``."""
MAX_METADATA_BYTES = 256 * 2**20
"""Default byte limit of one metadata.jsonl / metadata.csv, which is read whole into memory."""
MAX_SIDECAR_BYTES = 2**20
"""Byte limit of one sidecar caption .txt file (captions are truncated far below this anyway)."""


@dataclass(frozen=True)
class ReadLimits:
    """The most bytes a source reads for one thing (see the module doc)."""

    max_image_bytes: int = MAX_IMAGE_BYTES
    max_metadata_bytes: int = MAX_METADATA_BYTES


@dataclass(frozen=True)
class SourceEntry:
    """One file of the source: the unit of incremental ingestion."""

    key: str
    """Path relative to the source root (``photos/cat.jpg``, ``data/train-00000.parquet``)."""
    size: int | None
    """Bytes; None for a metadata row whose image file does not exist."""
    etag: str | None = None
    """The object store's ETag when it gives one (S3); None on a local disk."""
    caption: str | None = None
    """A short hash of the caption and attributes the source gives this image (None for Parquet entries).
    An image dropped for a missing caption is read again once its caption lands, and not before."""

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What the manifest remembers: an entry with the same key and fingerprint is not read again."""
        return {"size": self.size, "etag": self.etag, "caption": self.caption}


@dataclass
class RawRecord:
    """One image–caption pair as the source holds it, before any cleaning."""

    source: str
    """Identifier stored in the ``source`` column: the relative path, or ``shard.parquet#row``."""
    data: bytes | None
    """The image file's bytes; None when the image is missing."""
    caption: str | bytes | None
    """As found: None when there is no caption at all."""
    attributes: dict[str, Any] = field(default_factory=dict)
    filename: str = ""
    """A file name to derive a caption from under the ``filename`` policy."""
    problem: str | None = None
    """Why ``data`` is None when the reason is not simply a missing image (``path_outside_source``, ``too_large``)."""


def _regular(info: dict[str, Any]) -> bool:
    return info.get("type", "file") == "file"


class NotARegularFile(OSError):
    """A local path that is a device, a FIFO or a directory: never opened."""


class UnreadableEntry(Exception):
    """An entry that could not be read at all (I/O error, not a Parquet file): counted, never a crash."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _scalar(value: Any) -> Any:
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
        return str(value)
    if value is None or isinstance(value, _SCALARS):
        return value
    return valid_text(json.dumps(value, ensure_ascii=False, default=str))


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


def _ext(rel: str) -> str:
    return posixpath.splitext(rel)[1].lower()


def list_files(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every file under ``url``: relative path -> fsspec info (``size``, ``ETag`` on S3). Fresh, never cached.

    Local entries that are no regular file (a device, a FIFO, a symlink to one) are listed with ``type`` "other":
    they are counted, never opened (a FIFO would block, ``/dev/zero`` never ends)."""
    fs, root = storage.get_fs(url, storage_options)
    root = root.rstrip("/")
    # A long-lived process (a Dagster code server) must see files that landed since its last listing.
    fs.invalidate_cache(root)
    if not fs.exists(root):
        raise FileNotFoundError(f"ingestion source does not exist: {redact_url(url)}")
    found = fs.find(root, detail=True)
    out: dict[str, dict[str, Any]] = {}
    for path, info in found.items():
        if info.get("type", "file") not in ("file", "other"):
            continue
        rel = path[len(root) :].lstrip("/")
        if rel:
            out[rel] = info
    return dict(sorted(out.items()))


def _etag(info: dict[str, Any]) -> str | None:
    etag = info.get("ETag") or info.get("etag")
    return str(etag).strip('"') if etag else None


def _entry(rel: str, info: dict[str, Any], caption: str | None = None) -> SourceEntry:
    return SourceEntry(key=rel, size=int(info.get("size") or 0), etag=_etag(info), caption=caption)


def _digest(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte (a JSON "\ud800"): kept as it is
        data = text.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:16]


def detect_layout(files: dict[str, dict[str, Any]]) -> str:
    """``parquet`` when the source holds Parquet files and no images, else ``imagefolder``."""
    visible = [rel for rel in files if not _is_hidden(rel)]
    has_images = any(_ext(rel) in IMAGE_EXTENSIONS for rel in visible)
    has_parquet = any(_ext(rel) == ".parquet" for rel in visible)
    if has_parquet and not has_images:
        return "parquet"
    if has_images or any(posixpath.basename(rel) in METADATA_NAMES for rel in visible):
        return "imagefolder"
    raise ValueError(
        "cannot detect the layout of the ingestion source: it holds neither image files "
        f"({', '.join(IMAGE_EXTENSIONS)}) nor .parquet files"
    )


def canonical_source_url(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """One spelling per source (``./data``, ``/abs/data`` and ``file:///abs/data`` agree): the manifest's key."""
    _, path = storage.get_fs(url, storage_options)
    protocol = storage.protocol_of(url)
    path = path.rstrip("/") or "/"
    if protocol == "file":
        return "file://" + os.path.abspath(path)
    return redact_url(f"{protocol}://{path}")


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """The csv module's field limit (process-wide state) raised to ``limit`` while one file is parsed."""
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, limit))
    try:
        yield
    finally:
        csv.field_size_limit(old)


class Source(abc.ABC):
    """A readable ingestion source: its entries, and the records inside each."""

    layout: str

    def __init__(
        self,
        url: str,
        files: dict[str, dict[str, Any]],
        storage_options: dict[str, Any] | None,
        limits: ReadLimits | None = None,
    ) -> None:
        self.url = str(url).rstrip("/")
        self._files = files
        self._storage_options = storage_options
        self.limits = limits or ReadLimits()
        self.ignored_files: list[str] = []
        """Files that are neither images, captions, metadata nor data (README, .DS_Store, …)."""
        self.problems: Counter[str] = Counter()
        """Defects of the source's index files (a malformed metadata line), found while listing it."""

    @abc.abstractmethod
    def entries(self) -> list[SourceEntry]:
        """Every entry of the source, sorted by key."""

    @abc.abstractmethod
    def records(self, entry: SourceEntry) -> Iterator[RawRecord]:
        """The rows of one entry, in order. Raises `UnreadableEntry` when the entry cannot be read."""

    def _read(self, rel: str, max_bytes: int) -> bytes:
        """At most ``max_bytes`` of the file ``rel`` under the source (`TooLarge` beyond); never a path outside it."""
        inside = contained_path(rel)
        if inside is None:
            raise ValueError(f"{rel!r} is not a path under the source {redact_url(self.url)}")
        url = storage.join(self.url, inside)
        if (
            storage.is_local(url)
            and os.path.exists(storage.local_path(url))
            and not os.path.isfile(storage.local_path(url))
        ):
            raise NotARegularFile(f"{rel}: not a regular file")
        return storage.read_bytes(url, self._storage_options, max_bytes=max_bytes)


class ImageFolderSource(Source):
    """Images in a folder tree; captions from metadata.jsonl/metadata.csv, else sidecar .txt files."""

    layout = "imagefolder"

    def __init__(
        self,
        url: str,
        files: dict[str, dict[str, Any]],
        storage_options: dict[str, Any] | None = None,
        caption_column: str | None = None,
        limits: ReadLimits | None = None,
        image_column: str | None = None,
    ) -> None:
        # image_column does not apply (the images are files, not a column); taken so that `open_source` opens every
        # layout with the same arguments.
        super().__init__(url, files, storage_options, limits)
        self._caption_column = caption_column
        # relative image path -> (caption as found, attributes). The caption index is held in memory; the
        # images are not (they are read one entry at a time).
        self._metadata: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._images: list[str] = []
        self._sidecars: set[str] = set()
        metadata_files: dict[str, str] = {}  # folder -> metadata file (jsonl preferred)
        for rel in files:
            if _is_hidden(rel) or not (_regular(files[rel]) or _ext(rel) in IMAGE_EXTENSIONS):
                self.ignored_files.append(rel)
                continue
            base = posixpath.basename(rel)
            if base in METADATA_NAMES:
                folder = posixpath.dirname(rel)
                if folder in metadata_files and metadata_files[folder].endswith(".jsonl"):
                    log.warning("ignoring %s: %s already describes that folder", rel, metadata_files[folder])
                    self.ignored_files.append(rel)
                    continue
                if folder in metadata_files:
                    self.ignored_files.append(metadata_files[folder])
                metadata_files[folder] = rel
            elif _ext(rel) in IMAGE_EXTENSIONS:
                self._images.append(rel)
            elif _ext(rel) == SIDECAR_EXTENSION:
                self._sidecars.add(rel)
            else:
                self.ignored_files.append(rel)
        for folder, rel in sorted(metadata_files.items()):
            self._load_metadata(folder, rel)
        image_set = set(self._images)
        self._missing = sorted(k for k in self._metadata if k not in image_set)
        # sidecars that caption no image are reported as ignored, not silently skipped
        image_stems = {posixpath.splitext(rel)[0] for rel in self._images}
        self.ignored_files += [rel for rel in sorted(self._sidecars) if posixpath.splitext(rel)[0] not in image_stems]

    def _caption_key(self, row: dict[str, Any]) -> str | None:
        if self._caption_column is not None:
            return self._caption_column if self._caption_column in row else None
        lower = {k.lower(): k for k in row}
        for name in CAPTION_COLUMN_NAMES:
            if name in lower:
                return lower[name]
        return None

    def _read_metadata(self, rel: str) -> str:
        limit = self.limits.max_metadata_bytes
        try:
            if int(self._files[rel].get("size") or 0) > limit:
                raise TooLarge(rel)
            return decode_text(self._read(rel, limit))
        except TooLarge:
            raise ValueError(
                f"metadata file {rel} of the source {redact_url(self.url)} is over max_metadata_bytes ({limit} "
                "bytes): split it into one metadata file per subfolder, or raise ingest.max_metadata_bytes"
            ) from None

    def _load_metadata(self, folder: str, rel: str) -> None:
        text = self._read_metadata(rel)
        if rel.endswith(".jsonl"):
            rows: list[dict[str, Any]] = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError) as e:  # not JSON, an int of 5000 digits, nesting 100k deep
                    row = str(e)
                if not isinstance(row, dict):
                    log.warning("%s, line %d: not a JSON object; line skipped", rel, lineno)
                    self.problems["bad_metadata_line"] += 1
                    continue
                rows.append(row)
        else:
            # CSV values stay strings: a CSV has no types, and guessing them per column breaks round trips. A field
            # may be as long as the file (its size is bounded above), not just the csv module's default 128 KiB.
            with _csv_field_limit(len(text) + 1):
                rows = list(csv.DictReader(io.StringIO(text, newline="")))
        for i, row in enumerate(rows):
            if None in row:  # a CSV row with more fields than the header: the extra ones have no name
                log.warning("%s, row %d: more fields than the header names; the extra ones are ignored", rel, i + 1)
                self.problems["metadata_extra_fields"] += 1
                del row[None]
            name = row.get("file_name")
            if not name:
                log.warning("%s, row %d: no file_name (the imagefolder convention needs one); row skipped", rel, i + 1)
                self.problems["metadata_row_without_file_name"] += 1
                continue
            # a file_name outside the source stays an entry of its own, refused when read (path_outside_source)
            key = posixpath.join(folder, str(name))
            key = contained_path(key) or key
            caption_key = self._caption_key(row)
            caption = row.get(caption_key) if caption_key else None
            attrs = {valid_text(k): _scalar(v) for k, v in row.items() if k not in ("file_name", caption_key)}
            self._metadata[key] = (caption, attrs)

    def entries(self) -> list[SourceEntry]:
        out = [_entry(rel, self._files[rel], self._caption_fingerprint(rel)) for rel in self._images]
        out += [SourceEntry(key=rel, size=None, caption=self._caption_fingerprint(rel)) for rel in self._missing]
        return sorted(out, key=lambda e: e.key)

    def _caption_fingerprint(self, rel: str) -> str:
        # metadata rows are in memory: hash them; a sidecar is judged by its size/ETag (no read needed)
        if rel in self._metadata:
            return "metadata:" + _digest(self._metadata[rel])
        sidecar = posixpath.splitext(rel)[0] + SIDECAR_EXTENSION
        if sidecar in self._sidecars:
            info = self._files[sidecar]
            return "sidecar:" + _digest([info.get("size"), _etag(info)])
        return "none"

    def records(self, entry: SourceEntry) -> Iterator[RawRecord]:
        rel = entry.key
        if contained_path(rel) is None:  # a metadata row naming /etc/passwd or ../../secret.png
            raise UnreadableEntry("path_outside_source", f"{rel!r} is not under the source")
        if rel in self._files and not _regular(self._files[rel]):
            raise UnreadableEntry("not_a_regular_file", f"{rel}: a device, FIFO or link to one")
        limit = self.limits.max_image_bytes
        if entry.size is not None and entry.size > limit:
            raise UnreadableEntry("too_large", f"{rel}: {entry.size} bytes > max_image_bytes {limit}")
        try:
            if rel in self._metadata:
                caption, attrs = self._metadata[rel]
            else:
                caption, attrs = self._sidecar_caption(rel), {}
            data = self._read(rel, limit) if entry.size is not None else None
        except TooLarge:  # the listing's size was wrong (a file that grew, a device)
            raise UnreadableEntry("too_large", f"{rel}: over max_image_bytes {limit}") from None
        except NotARegularFile as e:
            raise UnreadableEntry("not_a_regular_file", str(e)) from None
        except OSError as e:
            raise UnreadableEntry("unreadable", f"{rel}: {e}") from None
        yield RawRecord(source=rel, data=data, caption=caption, attributes=dict(attrs), filename=rel)

    def _sidecar_caption(self, rel: str) -> str | None:
        sidecar = posixpath.splitext(rel)[0] + SIDECAR_EXTENSION
        if sidecar not in self._sidecars:
            return None
        try:
            return decode_text(self._read(sidecar, MAX_SIDECAR_BYTES))
        except TooLarge:
            raise UnreadableEntry("caption_too_large", f"{sidecar}: over {MAX_SIDECAR_BYTES} bytes") from None


class ParquetSource(Source):
    """Parquet shards in the Hugging Face datasets layout."""

    layout = "parquet"
    batch_rows = 64  # rows decoded at once: bounds memory on shards of large images

    def __init__(
        self,
        url: str,
        files: dict[str, dict[str, Any]],
        storage_options: dict[str, Any] | None = None,
        image_column: str | None = None,
        caption_column: str | None = None,
        limits: ReadLimits | None = None,
    ) -> None:
        super().__init__(url, files, storage_options, limits)
        self._image_column = image_column
        self._caption_column = caption_column
        self._shards = []
        for rel in files:
            if not _is_hidden(rel) and _ext(rel) == ".parquet" and _regular(files[rel]):
                self._shards.append(rel)
            else:
                self.ignored_files.append(rel)

    def entries(self) -> list[SourceEntry]:
        return [_entry(rel, self._files[rel]) for rel in self._shards]

    def _columns(self, schema: pa.Schema, rel: str) -> tuple[str, str | None, list[str]]:
        names = schema.names

        def is_image_type(t: pa.DataType) -> bool:
            if pa.types.is_binary(t) or pa.types.is_large_binary(t):
                return True
            return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0

        if self._image_column is not None:
            if self._image_column not in names:
                raise ValueError(f"{rel}: image column {self._image_column!r} not in {names}")
            image = self._image_column
        else:
            by_lower = {n.lower(): n for n in names}
            candidates = [by_lower[n] for n in IMAGE_COLUMN_NAMES if n in by_lower]
            candidates += [n for n in names if n not in candidates]
            typed = [n for n in candidates if is_image_type(schema.field(n).type)]
            if not typed:
                raise ValueError(
                    f"{rel}: no image column (a binary column or a struct with a 'bytes' field); columns: {names}"
                )
            image = typed[0]
        if self._caption_column is not None:
            if self._caption_column not in names:
                raise ValueError(f"{rel}: caption column {self._caption_column!r} not in {names}")
            caption: str | None = self._caption_column
        else:
            by_lower = {n.lower(): n for n in names if n != image}
            caption = next((by_lower[n] for n in CAPTION_COLUMN_NAMES if n in by_lower), None)
            if caption is None:
                log.warning("%s: no caption column among %s; every row counts as missing a caption", rel, names)
        attrs = []
        for n in names:
            if n in (image, caption):
                continue
            t = schema.field(n).type
            if (
                pa.types.is_integer(t)
                or pa.types.is_floating(t)
                or pa.types.is_boolean(t)
                or pa.types.is_string(t)
                or pa.types.is_large_string(t)
            ):
                attrs.append(n)
            else:
                log.info("%s: column %r (%s) is not a scalar and is not carried as an attribute", rel, n, t)
        return image, caption, attrs

    def records(self, entry: SourceEntry) -> Iterator[RawRecord]:
        rel = entry.key
        try:
            f = storage.open_url(storage.join(self.url, rel), "rb", self._storage_options)
            parquet = pq.ParquetFile(f)
        except (OSError, pa.ArrowInvalid) as e:
            raise UnreadableEntry("corrupt_parquet", f"{rel}: {e}") from None
        with f:
            try:
                image_col, caption_col, attr_cols = self._columns(parquet.schema_arrow, rel)
            except ValueError as e:  # no image column: this file is counted, the others are still read
                raise UnreadableEntry("no_image_column", str(e)) from None
            columns = [image_col] + ([caption_col] if caption_col else []) + attr_cols
            row = 0
            try:
                for batch in parquet.iter_batches(batch_size=self.batch_rows, columns=columns):
                    for values in batch.to_pylist():
                        yield self._record(rel, row, values, image_col, caption_col, attr_cols)
                        row += 1
            except (OSError, pa.ArrowInvalid) as e:
                # rows already yielded stand; the unreadable rest of the file is one counted entry
                raise UnreadableEntry("corrupt_parquet", f"{rel} after row {row}: {e}") from None

    def _record(
        self, rel: str, row: int, values: dict[str, Any], image_col: str, caption_col: str | None, attr_cols: list[str]
    ) -> RawRecord:
        image = values[image_col]
        path = ""
        problem = None
        if isinstance(image, dict):  # the datasets Image feature: {"bytes": …, "path": …}
            path = valid_text(str(image.get("path") or ""))
            data = image.get("bytes")
            if data is None and path:
                # a non-embedded Image feature: the path is relative to the shard's folder, and must stay under it
                inside = contained_path(path)
                if inside is None:
                    problem = "path_outside_source"
                else:
                    data, problem = self._read_referenced(posixpath.join(posixpath.dirname(rel), inside))
        else:
            data = image
        if data is not None and len(data) > self.limits.max_image_bytes:
            data, problem = None, "too_large"
        caption = values.get(caption_col) if caption_col else None
        if isinstance(caption, list):  # several captions per image (COCO style): the first non-empty one
            caption = next((c for c in caption if c and str(c).strip()), caption[0] if caption else None)
        attrs = {k: _scalar(values[k]) for k in attr_cols}
        return RawRecord(
            source=f"{rel}#{row}", data=data, caption=caption, attributes=attrs, filename=path or rel, problem=problem
        )

    def _read_referenced(self, rel: str) -> tuple[bytes | None, str | None]:
        """(bytes, None), or (None, why): ``too_large``, or None for a file that is not there."""
        if contained_path(rel) is None:  # the shard's folder plus the path climbed out after all
            return None, "path_outside_source"
        try:
            return self._read(rel, self.limits.max_image_bytes), None
        except TooLarge:
            return None, "too_large"
        except NotARegularFile:
            return None, "not_a_regular_file"
        except OSError:
            return None, None


# The reader of each layout, by name. Adding a layout is one entry here: `Layout`, the names a config accepts, and
# `open_source` follow from it.
SOURCES: dict[str, type[Source]] = {cls.layout: cls for cls in (ImageFolderSource, ParquetSource)}
Layout = Literal["auto", *SOURCES]
"""A layout name as a config field accepts it: a reader's name, or "auto" to detect it (`detect_layout`)."""


def open_source(
    url: str,
    layout: Layout = "auto",
    storage_options: dict[str, Any] | None = None,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    limits: ReadLimits | None = None,
) -> Source:
    """List ``url`` and return the `Source` for its layout (detected when ``layout="auto"``)."""
    files = list_files(url, storage_options)
    chosen = detect_layout(files) if layout == "auto" else layout
    if chosen not in SOURCES:
        raise ValueError(f"unknown layout {layout!r}")
    return SOURCES[chosen](
        url, files, storage_options, image_column=image_column, caption_column=caption_column, limits=limits
    )
