"""Writing a latent store: every shard written completely, atomically, before the metadata names it.

One writer at a time: `LatentStoreWriter.open` takes the store's writer lease (`ldm_core.leases`) and holds it
until `close`; it bumps the metadata's ``writer_generation`` (the fence) and commits the metadata only by
compare-and-swap, so a writer that lost the lease (a zombie) fails at its next commit. Shards are named with the
writer's generation (``<source stem>-g<generation>-<random>.<ext>``) and a writer removes only orphans of earlier
generations: a zombie that resumes its cleanup can never delete a shard the live writer has not recorded yet."""

from __future__ import annotations

import logging
import posixpath
import secrets
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ldm_core import storage
from ldm_core.data import canonical
from ldm_core.data.latent_store.backends import (
    NP_DTYPE,
    ROW_COLUMNS,
    SHARD_FORMATS,
    ShardColumns,
    attribute_names,
)
from ldm_core.data.latent_store.schema import (
    IDENTITY_FIELDS,
    SHARD_GENERATION_RE,
    SHARD_NAME_RE,
    SHARDS_DIR,
    TENSOR_FIELDS,
    EncodeRun,
    LatentStoreConfig,
    LatentStoreMetadata,
    LatentStoreMismatchError,
    StoreShard,
    metadata_bytes,
    metadata_url,
    parse_metadata,
    utc_now,
    write_uncond,
)
from ldm_core.data.sources import redact_url
from ldm_core.leases import FencedFile, WriterLease, pause_before_commit

log = logging.getLogger(__name__)


class LatentStoreWriter:
    """Adds shards to a store: each is written in full under a fresh name, then recorded in the metadata.

    `encode_dataset` uses it; so can anything that produces latents some other way (the loader benchmark writes
    random tensors through it). ``open`` creates the store, or checks that an existing one was built by the same
    autoencoder, text encoder and format; it holds the store's writer lease until `close` (or the ``with`` block
    ends).
    """

    def __init__(
        self,
        store_url: str,
        metadata: LatentStoreMetadata,
        config: LatentStoreConfig,
        storage_options: dict[str, Any] | None = None,
        fenced: FencedFile | None = None,
    ):
        """``fenced``: the metadata under this writer's lease, as `open` makes it; None takes the lease of the
        existing store here (``metadata`` is then re-read under it)."""
        if fenced is None:

            def existing(raw: bytes | None, url: str) -> LatentStoreMetadata:
                if raw is None:
                    raise FileNotFoundError(f"no latent store at {redact_url(store_url)}")
                return parse_metadata(raw, url)

            fenced, metadata = _take(store_url, storage_options, existing)
        self.url, self.metadata, self.config, self.storage_options = store_url, metadata, config, storage_options
        self.fenced, self.lease = fenced, fenced.lease
        self.format = SHARD_FORMATS[metadata.backend]
        try:
            self.remove_orphans()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(
        cls,
        store_url: str,
        template: LatentStoreMetadata,
        config: LatentStoreConfig,
        uncond: tuple[torch.Tensor, ...],
        storage_options: dict[str, Any] | None = None,
        lease: WriterLease | None = None,
    ) -> LatentStoreWriter:
        """Open ``store_url`` for adding shards described by ``template`` (identities, shapes, format; no shards).

        uncond: the empty prompt's (context (1, L, D), mask (1, L), pooled (1, D_pool)), written when the store is
        created. A store of another format is refused (`LatentStoreFormatError`). Waits for (then refuses) another
        live writer of the store (`ldm_core.leases.LeaseHeldError`); ``lease``: one made by the caller (its own
        ttl, wait or clock), not yet acquired.
        """
        if len(uncond) != 3:
            raise ValueError(f"uncond must be (context, mask, pooled); got {len(uncond)} tensors")

        def load(raw: bytes | None, url: str) -> LatentStoreMetadata:
            if raw is None:
                write_uncond(store_url, uncond, storage_options)  # before the metadata that names the store
                return template.model_copy(deep=True, update={"created_at": utc_now(), "shards": [], "runs": []})
            meta = parse_metadata(raw, url)
            _check_compatible(store_url, meta, template)
            return meta

        # identities are fixed from the first moment on
        fenced, meta = _take(store_url, storage_options, load, lease)
        return cls(store_url, meta, config, storage_options, fenced)

    def close(self) -> None:
        """Give the store's writer lease back (another writer may open the store)."""
        self.lease.release()

    def __enter__(self) -> LatentStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _commit(self) -> None:
        # the metadata follows the shards: a reader never sees a record of a shard that is not all there
        self.fenced.commit(metadata_bytes(self.metadata))

    def shard_url(self, name: str) -> str:
        return storage.join(self.url, SHARDS_DIR, name)

    def _new_shard_name(self, source: str) -> str:
        generation = self.metadata.writer_generation or 0
        return f"{posixpath.splitext(source)[0]}-g{generation}-{secrets.token_hex(4)}.{self.format.ext}"

    def remove_orphans(self) -> list[str]:
        """Delete shard objects the metadata does not name, left by a run killed (or a writer fenced off) before
        recording them: only those of earlier writer generations, never one a later (live) writer may record."""
        known = {s.name for s in self.metadata.shards if s.name}
        generation = self.metadata.writer_generation or 0
        removed = []
        for name in storage.list_dir(storage.join(self.url, SHARDS_DIR), self.storage_options):
            if not SHARD_NAME_RE.match(name) or name in known:
                continue
            m = SHARD_GENERATION_RE.search(name)
            if m is not None and int(m.group("generation")) >= generation:
                continue  # this writer's own, or a later writer's: not an orphan of ours to delete
            storage.remove(self.shard_url(name), self.storage_options, recursive=True)
            removed.append(name)
        if removed:
            log.info("removed %d incomplete shard(s) of an interrupted run: %s", len(removed), removed)
        # and the partial temp files of atomic writes (Parquet shards, the metadata) a kill left behind
        for directory in (self.url, storage.join(self.url, SHARDS_DIR)):
            storage.remove_stale_temp_files(directory, self.storage_options)
        return removed

    def write_shard(self, source: str, cols: ShardColumns, *, source_rows: int, source_bytes: int = 0) -> StoreShard:
        """Write one shard (rows are regrouped train first), then record it. Returns its record."""
        meta = self.metadata
        if source in meta.shard_by_source():
            raise ValueError(f"{self.url} already holds a shard for {source}")
        n = len(cols)
        self._check_shapes(cols)
        # an attribute called like a tensor field ("context" is a plausible metadata key) keeps its value under
        # the canonical clash prefix, as ingestion does for attributes named like core columns
        clash = [c for c in attribute_names(cols.rows) if c in TENSOR_FIELDS]
        if clash:
            cols.rows = cols.rows.rename_columns(
                [canonical.ATTRIBUTE_CLASH_PREFIX + c if c in clash else c for c in cols.rows.column_names]
            )
        splits = np.array(cols.rows.column("split").to_pylist(), dtype=object)
        if not set(splits) <= set(canonical.SPLITS):
            raise ValueError(f"split values must be in {canonical.SPLITS}, got {sorted(set(splits))}")
        order = np.argsort(splits != "train", kind="stable")  # train rows first, each group in its original order
        if not np.array_equal(order, np.arange(n)):
            cols = cols.take(order)
        n_train = int((splits == "train").sum())
        name, nbytes, checksums = None, 0, {}
        if n:
            name = self._new_shard_name(source)
            url = self.shard_url(name)
            checksums = self.format.write(url, cols, self.config, self.storage_options)
            nbytes = _size_of(url, self.storage_options)
        record = StoreShard(
            name=name,
            source=source,
            rows=n,
            train_rows=n_train,
            validation_rows=n - n_train,
            source_rows=source_rows,
            source_bytes=source_bytes,
            bytes=nbytes,
            checksums=checksums,
        )
        meta.shards.append(record)
        meta.rows += n
        meta.train_rows += n_train
        meta.validation_rows += n - n_train
        for a in attribute_names(cols.rows):
            if a not in meta.attribute_columns:
                meta.attribute_columns.append(a)
        pause_before_commit()
        self._commit()
        return record

    def record_run(self, run: EncodeRun) -> None:
        self.metadata.runs.append(run)
        self._commit()

    def _check_shapes(self, cols: ShardColumns) -> None:
        m, n = self.metadata, len(cols)
        want = {
            "latents": (n, *m.latent_shape),
            "context": (n, *m.context_shape),
            "context_mask": (n, m.context_shape[0]),
            "pooled": (n, m.pooled_dim),
        }
        if m.content == "moments":
            want["logvar"] = (n, *m.latent_shape)
        got = cols.tensors()
        if set(got) != set(want):
            raise ValueError(f"a {m.content} store needs fields {sorted(want)}, got {sorted(got)}")
        for k, shape in want.items():
            expected = np.dtype(bool) if k == "context_mask" else NP_DTYPE[m.dtype]
            if tuple(got[k].shape) != shape or got[k].dtype != expected:
                raise ValueError(f"{k}: expected {shape} {expected}, got {tuple(got[k].shape)} {got[k].dtype}")
        if cols.rows.num_rows != n or not set(ROW_COLUMNS) <= set(cols.rows.column_names):
            raise ValueError(f"rows must be a table of {n} rows with columns {ROW_COLUMNS} (+ attributes)")


def _take(
    store_url: str,
    storage_options: dict[str, Any] | None,
    load: Callable[[bytes | None, str], LatentStoreMetadata],
    lease: WriterLease | None = None,
) -> tuple[FencedFile, LatentStoreMetadata]:
    """Take the store's writer lease and fence its metadata (``load`` parses it, or makes it for a new store): from
    here on an earlier holder cannot commit. The lease is given back if this fails."""
    storage.makedirs(store_url, storage_options)
    lease = (lease or WriterLease(store_url, storage_options)).acquire()
    fenced = FencedFile(metadata_url(store_url), lease, storage_options)

    def stamp(raw: bytes | None) -> LatentStoreMetadata:
        meta = load(raw, fenced.url)
        meta.writer_generation = (meta.writer_generation or 0) + 1
        return meta

    try:
        return fenced, fenced.fence(stamp, metadata_bytes)
    except BaseException:
        lease.release()
        raise


def _size_of(url: str, storage_options: dict[str, Any] | None) -> int:
    fs, path = storage.get_fs(url, storage_options)
    return int(fs.du(path, total=True)) if fs.isdir(path) else int(fs.size(path))


def _check_compatible(store_url: str, existing: LatentStoreMetadata, new: LatentStoreMetadata) -> None:
    if existing.vae_identity != new.vae_identity:
        raise LatentStoreMismatchError(
            f"the latent store at {store_url} holds latents of the autoencoder {existing.vae_identity!r}; refusing to "
            f"add latents of {new.vae_identity!r}: latents of two autoencoders live in different spaces and must "
            "never be mixed. Encode into a new store URL (one per autoencoder version)."
        )
    if existing.text_encoder_identity != new.text_encoder_identity:
        raise LatentStoreMismatchError(
            f"the latent store at {store_url} holds text embeddings of {existing.text_encoder_identity!r}; refusing "
            f"to add embeddings of {new.text_encoder_identity!r}. Encode into a new store URL."
        )
    fields = list(IDENTITY_FIELDS) + (["seed"] if existing.content == "sample" else []) + ["pooled_dim"]
    diffs = {f: (getattr(existing, f), getattr(new, f)) for f in fields if getattr(existing, f) != getattr(new, f)}
    if diffs:
        detail = "; ".join(f"{f}: store has {a!r}, this run {b!r}" for f, (a, b) in diffs.items())
        raise LatentStoreMismatchError(
            f"the latent store at {store_url} was built differently ({detail}). "
            "Use the store's settings or a new store URL."
        )
