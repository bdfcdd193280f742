"""Ingestion: a user's image–caption source -> the canonical Parquet shards (see `canonical`).

`ingest` reads the source one entry at a time, cleans every image (`images.clean_image`) and caption
(`captions.clean_caption`), drops duplicates by pixel hash, and writes shards of ``rows_per_shard`` rows as they
fill: memory holds one shard, never the dataset. Each shard is written atomically, then the manifest (also
atomically) — so a run killed at any point leaves a consistent dataset.

Incremental: the manifest remembers every source entry already ingested (path + size + ETag, plus a fingerprint of
the caption the source gives it, so an image dropped for lack of a caption is retried once the caption lands). A
rerun over the same source reads nothing; a source that grew is read only for its new or changed entries, which go to
new shards; existing shards are never rewritten. Duplicates are checked against every shard already written.

Concurrent runs: a run holds the dataset's writer lease (`ldm_core.leases`) from reading the manifest to its last
commit, so a second run into the same dataset waits and then finds the entries already ingested. Shards are created
exclusively (a name that exists is never replaced: the next index is taken), and each manifest commit is a
compare-and-swap fenced by the lease, so a writer that lost its lease (paused past it) fails at its next commit
instead of dropping the rows another run recorded.

Bad input never crashes a run and is never lost silently: every dropped row is counted under a reason
(`IngestResult.bad`), every repair under an informational counter (`IngestResult.converted`,
`IngestResult.caption_fixes`). When the dropped fraction of the rows this run examined exceeds
``max_bad_fraction``, `IngestError` is raised *after* the whole source was counted, naming the source and the top
reasons. What the run already wrote stays (nothing is deleted); the entries that were dropped are not recorded
as ingested, so a rerun over the unchanged source fails the same way until the source is fixed or the limit
raised.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from ldm_core import storage
from ldm_core.config import StrictModel
from ldm_core.data import canonical
from ldm_core.data.canonical import EntryRecord, Manifest, RunRecord, ShardInfo
from ldm_core.data.captions import CaptionPolicy, CaptionResult, clean_caption, valid_text
from ldm_core.data.images import CleanImage, ImageRejected, clean_image
from ldm_core.data.integrity import sha256_hex
from ldm_core.data.sources import (
    MAX_IMAGE_BYTES,
    MAX_METADATA_BYTES,
    Layout,
    RawRecord,
    ReadLimits,
    Source,
    SourceEntry,
    UnreadableEntry,
    canonical_source_url,
    open_source,
    redact_url,
)
from ldm_core.leases import FencedFile, WriterLease, pause_before_commit

log = logging.getLogger(__name__)


class IngestConfig(StrictModel):
    """How to read one image–caption source into canonical shards."""

    source: str
    """fsspec URL of the source: a local path, ``file://…`` or ``s3://bucket/prefix``."""
    layout: Layout = "auto"
    """``imagefolder`` (images + metadata.jsonl/csv or sidecar .txt), ``parquet`` (Hugging Face datasets shards),
    or ``auto``: parquet when the source holds .parquet files and no images."""
    image_column: str | None = None
    """Parquet layout: the image column; None detects it (``image``, ``img``, …, else the first binary column)."""
    caption_column: str | None = None
    """The caption column / metadata key; None detects it (``text``, ``caption``, ``prompt``, …)."""
    rows_per_shard: int = Field(1000, ge=1)
    """Rows per output shard: the unit of atomic writes, and of memory during ingestion."""
    min_size: int = Field(8, ge=1)
    """Images whose shorter side is below this many pixels are dropped (``too_small``)."""
    max_pixels: int = Field(50_000_000, ge=1)
    """Decompression-bomb limit: images with more pixels (from the header) are dropped before decoding."""
    max_image_bytes: int = Field(MAX_IMAGE_BYTES, ge=1)
    """Images (files, or a Parquet row's image value) over this many bytes are dropped (``too_large``); no more
    than this is ever read for one image."""
    max_metadata_bytes: int = Field(MAX_METADATA_BYTES, ge=1)
    """A metadata.jsonl / metadata.csv over this many bytes (each is read whole) refuses the source, naming it."""
    caption_policy: CaptionPolicy = "drop"
    """Missing or empty caption: ``drop`` the pair, keep it with an ``empty`` caption (still useful to the
    unconditional branch of classifier-free guidance), or caption it from its ``filename``."""
    max_caption_chars: int = Field(1000, ge=1)
    """Longer captions are truncated to this many characters (and counted)."""
    max_bad_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """Fail the run when more than this fraction of the rows it examined were dropped as bad."""
    val_fraction: float = Field(0.05, ge=0.0, le=1.0)
    """Fraction of images in the validation split, chosen by hash (stable across runs)."""
    storage_options: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)
    """fsspec options for the *source* (credentials, endpoint). Excluded from dumps, reprs and logs."""

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("source must be a path or URL")
        return v


class IngestResult(BaseModel):
    """What one `ingest` call did (counts are for this run unless named ``*_total``)."""

    output_url: str
    source: str
    """The source URL, without credentials."""
    layout: str
    rows_total: int
    """Rows in the dataset after this run."""
    rows_new: int
    train_rows_total: int
    validation_rows_total: int
    shards: list[str]
    """Every shard of the dataset, in order."""
    new_shards: list[str]
    rows_examined: int
    """Rows read from new source entries: rows_new + sum(bad) + skipped_duplicates."""
    bad: dict[str, int]
    """Dropped rows by reason (corrupt, not_an_image, too_small, decompression_bomb, too_large, missing_caption,
    path_outside_source, not_a_regular_file, invalid_file_name, caption_too_large, corrupt_parquet, …)."""
    converted: dict[str, int]
    """Kept images that were repaired, by conversion (converted_cmyk, converted_16bit, converted_alpha, …)."""
    caption_fixes: dict[str, int]
    """Kept captions that were repaired (caption_truncated, caption_non_utf8, caption_empty_filled, …)."""
    skipped_duplicates: int
    sources_seen: int
    """Entries (files) listed in the source."""
    sources_new: int
    """Entries read this run (new, or changed since they were ingested)."""
    ignored_files: int
    """Files in the source that are neither images, captions, metadata nor Parquet."""
    source_problems: dict[str, int]
    """Defects of the source's index files (malformed metadata lines), not tied to one image."""
    status: Literal["ok", "failed"] = "ok"

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class IngestError(RuntimeError):
    """Too much of a source was bad. ``result`` holds the full counts of the failed run."""

    def __init__(self, message: str, result: IngestResult) -> None:
        super().__init__(message)
        self.result = result


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _add(total: dict[str, int], counts: Counter[str] | dict[str, int]) -> dict[str, int]:
    out = Counter(total)
    out.update(counts)
    return dict(sorted(out.items()))


class _ShardWriter:
    """Buffers rows, writes a shard when full, then the manifest; knows which entries each flush commits."""

    def __init__(
        self,
        output_url: str,
        manifest: Manifest,
        fenced: FencedFile,
        source_key: str,
        rows_per_shard: int,
        storage_options: Any,
    ) -> None:
        self.output_url = output_url
        self.manifest = manifest
        self.fenced = fenced
        self.source_key = source_key
        self.rows_per_shard = rows_per_shard
        self.storage_options = storage_options
        self.rows: list[dict[str, Any]] = []
        # entries fully read whose rows are all written or in the buffer: committed by the next flush
        self.finished: list[tuple[SourceEntry, str]] = []
        self.new_shards: list[str] = []
        # partial writes of a killed run (or of a previous lease holder: its commits are fenced off by now)
        storage.remove_stale_temp_files(output_url, storage_options)
        existing = [canonical.shard_index(n) for n in storage.list_dir(output_url, storage_options)]
        existing += [canonical.shard_index(n) for n in manifest.shard_names()]
        # never reuse a shard name, not even one an interrupted run left behind without a manifest entry
        self.next_index = max([i for i in existing if i is not None], default=-1) + 1

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.rows_per_shard:
            self.flush()

    def entry_finished(self, entry: SourceEntry, status: str) -> None:
        self.finished.append((entry, status))

    def flush(self, force_manifest: bool = False) -> None:
        if not (self.rows or self.finished or force_manifest):
            return
        if self.rows:
            table = canonical.build_table(self.rows)
            data = canonical.table_bytes(table)
            # created exclusively: a name another writer took (even one it never recorded) is skipped, not replaced
            while not storage.write_if_absent(
                storage.join(self.output_url, canonical.shard_name(self.next_index)), data, self.storage_options
            ):
                self.next_index += 1
            name = canonical.shard_name(self.next_index)
            self.next_index += 1
            self.new_shards.append(name)
            n_val = sum(r["split"] == "validation" for r in self.rows)
            info = ShardInfo(
                name=name,
                rows=len(self.rows),
                train_rows=len(self.rows) - n_val,
                validation_rows=n_val,
                bytes=len(data),
                sha256=sha256_hex(data),
            )
            m = self.manifest
            m.shards.append(info)
            m.counts.rows += info.rows
            m.counts.train_rows += info.train_rows
            m.counts.validation_rows += info.validation_rows
            for col in table.column_names[len(canonical.CORE_COLUMNS) :]:
                if col not in m.attribute_columns:
                    m.attribute_columns.append(col)
            log.info("wrote %s (%d rows)", storage.join(redact_url(self.output_url), name), info.rows)
            self.rows = []
        if self.finished:
            known = self.manifest.sources.setdefault(self.source_key, {})
            for entry, status in self.finished:
                known[entry.key] = EntryRecord(**entry.fingerprint, status=status)
            self.finished = []
        # the manifest follows the shard: a reader never sees a manifest naming a shard that is not there
        pause_before_commit()
        self.fenced.commit(canonical.manifest_bytes(self.manifest))


def _existing_hashes(output_url: str, manifest: Manifest, storage_options: Any) -> set[str]:
    hashes: set[str] = set()
    for name in manifest.shard_names():
        table = canonical.read_shard(output_url, name, columns=["sha256"], storage_options=storage_options)
        hashes.update(table.column("sha256").to_pylist())
    return hashes


def ingest(config: IngestConfig, output_url: str, storage_options: dict[str, Any] | None = None) -> IngestResult:
    """Ingest ``config.source`` into canonical shards under ``output_url`` (incrementally; see the module doc).

    ``storage_options`` are fsspec options for the *output*; the source's are ``config.storage_options``.
    Raises `IngestError` when the bad fraction exceeds ``config.max_bad_fraction`` (after counting everything).
    """
    started = _now()
    src_opts = config.storage_options or None
    source: Source = open_source(
        config.source,
        config.layout,
        src_opts,
        image_column=config.image_column,
        caption_column=config.caption_column,
        limits=ReadLimits(max_image_bytes=config.max_image_bytes, max_metadata_bytes=config.max_metadata_bytes),
    )
    source_key = canonical_source_url(config.source, src_opts)
    storage.makedirs(output_url, storage_options)
    with WriterLease(output_url, storage_options) as lease:
        return _ingest(config, source, source_key, output_url, storage_options, lease, started)


def _stamped(raw: bytes | None, url: str) -> Manifest:
    manifest = canonical.parse_manifest(raw, url) if raw is not None else Manifest()
    manifest.writer_generation = (manifest.writer_generation or 0) + 1
    return manifest


@dataclasses.dataclass
class _Tally:
    """What one run counts over the entries it reads."""

    bad: Counter[str] = dataclasses.field(default_factory=Counter)
    converted: Counter[str] = dataclasses.field(default_factory=Counter)
    caption_fixes: Counter[str] = dataclasses.field(default_factory=Counter)
    duplicates: int = 0
    rows_new: int = 0
    examined: int = 0
    unwritten: list[tuple[SourceEntry, str]] = dataclasses.field(default_factory=list)
    """Entries without a written row: recorded only if the run passes its bad-fraction check."""

    def failed(self, max_bad_fraction: float) -> bool:
        return self.examined > 0 and sum(self.bad.values()) / self.examined > max_bad_fraction


def _ingest(
    config: IngestConfig,
    source: Source,
    source_key: str,
    output_url: str,
    storage_options: Any,
    lease: WriterLease,
    started: str,
) -> IngestResult:
    """`ingest` under the dataset's writer lease: everything from reading the manifest to the last commit."""
    fenced = FencedFile(canonical.manifest_url(output_url), lease, storage_options)
    manifest = fenced.fence(lambda raw: _stamped(raw, fenced.url), canonical.manifest_bytes)
    entries = source.entries()
    new_entries = _new_entries(entries, manifest.sources.get(source_key, {}))
    log.info(
        "ingesting %s (%s): %d entries, %d new",
        redact_url(config.source),
        source.layout,
        len(entries),
        len(new_entries),
    )
    seen = _existing_hashes(output_url, manifest, storage_options) if new_entries else set()
    writer = _ShardWriter(output_url, manifest, fenced, source_key, config.rows_per_shard, storage_options)
    tally = _Tally()
    for entry in new_entries:
        _ingest_entry(entry, source, config, seen, writer, tally)
    writer.flush()
    status = _record_run(manifest, writer, tally, config, source_key, started)
    result = _result(config, source, output_url, manifest, writer, tally, status, len(entries), len(new_entries))
    log.info(
        "ingested %s: %d new rows (%d total) in %d new shards; bad %s; duplicates %d",
        result.source,
        tally.rows_new,
        result.rows_total,
        len(result.new_shards),
        result.bad,
        tally.duplicates,
    )
    if status == "failed":
        raise _too_many_bad(config, result, tally)
    return result


def _new_entries(entries: list[SourceEntry], known: dict[str, EntryRecord]) -> list[SourceEntry]:
    """The entries this dataset has not ingested, or whose size, etag or caption changed since it did."""
    return [
        e
        for e in entries
        if valid_text(e.key) not in known
        or known[valid_text(e.key)].model_dump(include={"size", "etag", "caption"}) != e.fingerprint
    ]


def _ingest_entry(
    entry: SourceEntry,
    source: Source,
    config: IngestConfig,
    seen: set[str],
    writer: _ShardWriter,
    tally: _Tally,
) -> None:
    """Write one entry's good, new rows; count its bad rows and duplicates; and note how it ended (written, all
    bad, all duplicates, empty), except after a read error that may be transient, which leaves it to the next run."""
    if valid_text(entry.key) != entry.key:
        # a local file name that is not UTF-8: no shard or manifest can hold it, so it is counted and remembered
        # under its name with U+FFFD for the undecodable bytes
        tally.examined += 1
        tally.bad["invalid_file_name"] += 1
        log.warning("skipped %r: the file name is not valid UTF-8", entry.key)
        tally.unwritten.append((dataclasses.replace(entry, key=valid_text(entry.key)), "bad:invalid_file_name"))
        return
    written = dupes = 0
    reasons: Counter[str] = Counter()
    try:
        for record in source.records(entry):
            tally.examined += 1
            row = _clean_row(record, config, reasons)
            if row is None:
                continue
            image, caption = row
            if image.sha256 in seen:
                dupes += 1
                continue
            seen.add(image.sha256)
            tally.converted.update(image.conversions)
            tally.caption_fixes.update(caption.fixes)
            writer.add(_row(record, image, caption.caption, config.val_fraction))
            written += 1
    except UnreadableEntry as e:
        tally.examined += 1  # one count for the unreadable (rest of the) entry
        reasons[e.reason] += 1
        log.warning("could not read %s: %s", entry.key, e)
        if e.reason == "unreadable" and not written:
            # an I/O error may be transient: not remembered, so the next run tries the entry again
            tally.bad.update(reasons)
            tally.duplicates += dupes
            return
    tally.bad.update(reasons)
    tally.duplicates += dupes
    tally.rows_new += written
    if written:
        writer.entry_finished(entry, "ok")
    elif reasons:
        tally.unwritten.append((entry, f"bad:{reasons.most_common(1)[0][0]}"))
    elif dupes:
        tally.unwritten.append((entry, "duplicate"))
    else:  # an empty Parquet file
        tally.unwritten.append((entry, "empty"))


def _clean_row(
    record: RawRecord, config: IngestConfig, reasons: Counter[str]
) -> tuple[CleanImage, CaptionResult] | None:
    """The record's cleaned image and caption, or None with the reason counted in ``reasons``."""
    if record.data is None:
        reasons[record.problem or "missing_image"] += 1
        return None
    try:
        image = clean_image(record.data, min_size=config.min_size, max_pixels=config.max_pixels)
    except ImageRejected as e:
        reasons[e.reason] += 1
        log.debug("dropped %s: %s", record.source, e)
        return None
    caption = clean_caption(
        record.caption,
        policy=config.caption_policy,
        max_chars=config.max_caption_chars,
        filename=record.filename,
    )
    if caption.caption is None:
        reasons[caption.drop_reason or "missing_caption"] += 1
        return None
    return image, caption


def _row(record: RawRecord, image: CleanImage, caption: str, val_fraction: float) -> dict[str, Any]:
    return {
        "id": canonical.row_id(image.sha256),
        "image": image.data,
        "caption": caption,
        "width": image.width,
        "height": image.height,
        "sha256": image.sha256,
        "source": record.source,
        "split": canonical.split_of(image.sha256, val_fraction),
        "attributes": record.attributes,
    }


def _record_run(
    manifest: Manifest,
    writer: _ShardWriter,
    tally: _Tally,
    config: IngestConfig,
    source_key: str,
    started: str,
) -> Literal["ok", "failed"]:
    """Commit the run's record to the manifest: its counts, and, when it passed its bad-fraction check, the entries
    it wrote no row for (a failed run leaves them to be read again)."""
    failed = tally.failed(config.max_bad_fraction)
    if not failed:
        for entry, status in tally.unwritten:
            writer.entry_finished(entry, status)
        counts = manifest.counts
        counts.bad = _add(counts.bad, tally.bad)
        counts.skipped_duplicates += tally.duplicates
    manifest.counts.converted = _add(manifest.counts.converted, tally.converted)
    manifest.counts.caption_fixes = _add(manifest.counts.caption_fixes, tally.caption_fixes)
    status: Literal["ok", "failed"] = "failed" if failed else "ok"
    manifest.runs.append(
        RunRecord(
            source=source_key,
            started_at=started,
            finished_at=_now(),
            status=status,
            rows_new=tally.rows_new,
            new_shards=writer.new_shards,
            bad=dict(sorted(tally.bad.items())),
            converted=dict(sorted(tally.converted.items())),
            caption_fixes=dict(sorted(tally.caption_fixes.items())),
            skipped_duplicates=tally.duplicates,
        )
    )
    writer.flush(force_manifest=True)  # records the entries and the run (no rows are left to write)
    return status


def _result(
    config: IngestConfig,
    source: Source,
    output_url: str,
    manifest: Manifest,
    writer: _ShardWriter,
    tally: _Tally,
    status: Literal["ok", "failed"],
    sources_seen: int,
    sources_new: int,
) -> IngestResult:
    return IngestResult(
        output_url=redact_url(output_url),
        source=redact_url(config.source),
        layout=source.layout,
        rows_total=manifest.counts.rows,
        rows_new=tally.rows_new,
        train_rows_total=manifest.counts.train_rows,
        validation_rows_total=manifest.counts.validation_rows,
        shards=manifest.shard_names(),
        new_shards=writer.new_shards,
        rows_examined=tally.examined,
        bad=dict(sorted(tally.bad.items())),
        converted=dict(sorted(tally.converted.items())),
        caption_fixes=dict(sorted(tally.caption_fixes.items())),
        skipped_duplicates=tally.duplicates,
        sources_seen=sources_seen,
        sources_new=sources_new,
        ignored_files=len(source.ignored_files),
        source_problems=dict(sorted(source.problems.items())),
        status=status,
    )


def _too_many_bad(config: IngestConfig, result: IngestResult, tally: _Tally) -> IngestError:
    bad_total, examined = sum(tally.bad.values()), tally.examined
    top = ", ".join(f"{reason}={n}" for reason, n in tally.bad.most_common(5))
    return IngestError(
        f"ingestion of {result.source} dropped {bad_total} of {examined} rows "
        f"({bad_total / examined:.0%} > max_bad_fraction {config.max_bad_fraction:.0%}); top reasons: {top}. "
        f"The {tally.rows_new} good rows written stay in {result.output_url}; nothing was deleted. Fix the source "
        "(or raise max_bad_fraction, or set caption_policy if captions are missing) and run again.",
        result,
    )
