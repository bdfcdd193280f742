"""The canonical image dataset on storage: Parquet shards plus a manifest, the contract between ingestion and
every reader (the dataset, the latent store, the pipeline's asset).

Layout under the dataset URL::

    shard-00000.parquet   id, image, caption, width, height, sha256, source, split, <attribute columns…>
    shard-00001.parquet
    manifest.json         the shards that exist (and their row counts), the source entries already ingested,
                          cumulative counts, and one record per ingestion run

The manifest is the truth: a shard file it does not list (left by a run killed between writing the shard and
the manifest) is ignored by readers and never overwritten; its rows are ingested again into a new shard.
Shards are immutable once written: the manifest records each one's sha256, and `read_shard` given its `ShardInfo`
refuses a shard whose bytes changed since (`ldm_core.data.integrity`).
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from ldm_core import storage
from ldm_core.data.integrity import CorruptShardError, mismatch

FORMAT = "ldm-image-shards/1"
MANIFEST_NAME = "manifest.json"
SHARD_TEMPLATE = "shard-{:05d}.parquet"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")
SPLITS = ("train", "validation")

# The fixed columns, in order; attribute columns follow.
CORE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
    ]
)
CORE_COLUMNS = tuple(CORE_SCHEMA.names)
# An attribute named like a core column (a metadata column called "width") is stored under this prefix.
ATTRIBUTE_CLASH_PREFIX = "attr_"


def split_of(sha256: str, val_fraction: float) -> str:
    """``"validation"`` for a fixed ``val_fraction`` of images, decided by the hash alone.

    The same image lands in the same split in every run and every incremental ingestion, so validation images
    never leak into training when the dataset grows.
    """
    return "validation" if int(sha256[:8], 16) / 2**32 < val_fraction else "train"


def row_id(sha256: str) -> str:
    """A short stable id (duplicates are dropped by hash, so the hash prefix is unique in a dataset)."""
    return sha256[:16]


def shard_name(index: int) -> str:
    return SHARD_TEMPLATE.format(index)


def shard_index(name: str) -> int | None:
    m = _SHARD_RE.match(name)
    return int(m.group(1)) if m else None


def attribute_column(name: str) -> str:
    return ATTRIBUTE_CLASH_PREFIX + name if name in CORE_COLUMNS else name


class _Data(BaseModel):
    # Manifests are data written by this code, read back by (possibly newer) code: unknown keys are tolerated.
    model_config = ConfigDict(extra="ignore")


class ShardInfo(_Data):
    name: str
    rows: int
    train_rows: int
    validation_rows: int
    bytes: int
    sha256: str | None = None
    """Of the shard file as written; None when the manifest records none (the shard is read unchecked)."""


class EntryRecord(_Data):
    """A source entry already ingested: seen again with the same size and ETag, it is skipped."""

    size: int | None
    etag: str | None = None
    caption: str | None = None
    """Fingerprint of the caption the source gave (see `sources.SourceEntry.caption`)."""
    status: str
    """``ok`` (rows were written), ``duplicate`` (every row was a duplicate) or ``bad:<reason>``."""


class RunRecord(_Data):
    source: str
    started_at: str
    finished_at: str
    status: str
    """``ok`` or ``failed`` (bad fraction over the limit: what was written stays, see `ingest`)."""
    rows_new: int
    new_shards: list[str]
    bad: dict[str, int]
    converted: dict[str, int]
    caption_fixes: dict[str, int]
    skipped_duplicates: int


class Counts(_Data):
    """Cumulative over every successful run (plus the rows written by failed ones)."""

    rows: int = 0
    train_rows: int = 0
    validation_rows: int = 0
    bad: dict[str, int] = Field(default_factory=dict)
    converted: dict[str, int] = Field(default_factory=dict)
    caption_fixes: dict[str, int] = Field(default_factory=dict)
    skipped_duplicates: int = 0


class Manifest(_Data):
    format: str = FORMAT
    shards: list[ShardInfo] = Field(default_factory=list)
    attribute_columns: list[str] = Field(default_factory=list)
    """Every attribute column that appears in some shard (a shard may lack some)."""
    sources: dict[str, dict[str, EntryRecord]] = Field(default_factory=dict)
    """canonical source URL -> entry key -> what was ingested from it."""
    counts: Counts = Field(default_factory=Counts)
    runs: list[RunRecord] = Field(default_factory=list)
    writer_generation: int | None = None
    """Incremented by every writer when it takes the dataset's lease (the fence of `ldm_core.leases`: a previous
    holder's commit fails from then on); None in a manifest that no lease holder has written."""

    def shard_names(self) -> list[str]:
        return [s.name for s in self.shards]


def manifest_url(dataset_url: str) -> str:
    return storage.join(dataset_url, MANIFEST_NAME)


def parse_manifest(data: bytes, url: str) -> Manifest:
    manifest = Manifest.model_validate_json(data)
    if manifest.format != FORMAT:
        raise ValueError(f"{url}: unknown dataset format {manifest.format!r} (this code reads {FORMAT!r})")
    return manifest


def read_manifest(dataset_url: str, storage_options: dict[str, Any] | None = None) -> Manifest | None:
    """The dataset's manifest, or None when nothing has been ingested there yet."""
    url = manifest_url(dataset_url)
    if not storage.exists(url, storage_options):
        return None
    return parse_manifest(storage.read_bytes(url, storage_options), url)


def manifest_bytes(manifest: Manifest) -> bytes:
    text = json.dumps(manifest.model_dump(mode="json"), indent=1, ensure_ascii=False, sort_keys=False)
    return (text + "\n").encode("utf-8")


def write_manifest(dataset_url: str, manifest: Manifest, storage_options: dict[str, Any] | None = None) -> None:
    """Unconditionally (tests and tools); ingestion commits through its writer lease's fence instead."""
    storage.write_bytes_atomic(manifest_url(dataset_url), manifest_bytes(manifest), storage_options)


def _column_type(values: list[Any]) -> tuple[pa.DataType, list[Any]]:
    """One Arrow type for an attribute column: its Python type when all agree (int+float -> float), else text."""
    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return pa.string(), values
    if kinds == {bool}:
        return pa.bool_(), values
    if kinds == {int}:
        return pa.int64(), values
    if kinds <= {int, float}:
        return pa.float64(), [None if v is None else float(v) for v in values]
    if kinds == {str}:
        return pa.string(), values
    return pa.string(), [None if v is None else (json.dumps(v) if not isinstance(v, str) else v) for v in values]


def build_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with the core columns and an ``attributes`` dict) -> one shard's table."""
    columns: dict[str, list[Any]] = {name: [r[name] for r in rows] for name in CORE_COLUMNS}
    arrays = [pa.array(columns[f.name], type=f.type) for f in CORE_SCHEMA]
    fields = list(CORE_SCHEMA)
    attr_names = list(dict.fromkeys(k for r in rows for k in r["attributes"]))
    for name in attr_names:
        dtype, values = _column_type([r["attributes"].get(name) for r in rows])
        fields.append(pa.field(attribute_column(name), dtype))
        arrays.append(pa.array(values, type=dtype))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # Images are already compressed; one row group per shard keeps the format simple for readers.
    pq.write_table(table, buf, compression="snappy")
    return buf.getvalue()


def read_shard(
    dataset_url: str,
    name: str,
    columns: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    *,
    verify: ShardInfo | None = None,
) -> pa.Table:
    """One shard (or some of its columns). ``verify``: the shard's manifest record; the whole file is read and
    checked against its recorded size and sha256 (`CorruptShardError` when they differ; unchecked when the record
    has no sha256)."""
    url = storage.join(dataset_url, name)
    if verify is None or verify.sha256 is None:
        with storage.open_url(url, "rb", storage_options) as f:
            return pq.read_table(f, columns=columns)
    data = storage.read_bytes(url, storage_options)
    if (why := mismatch(data, verify.sha256, verify.bytes)) is not None:
        raise CorruptShardError("dataset", name, url, why, "ingest the source again into a new dataset URL")
    return pq.read_table(pa.BufferReader(data), columns=columns)


def shard_columns(dataset_url: str, name: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    with storage.open_url(storage.join(dataset_url, name), "rb", storage_options) as f:
        return pq.ParquetFile(f).schema_arrow.names
