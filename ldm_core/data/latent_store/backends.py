"""The two shard formats a latent store writes and reads, Zarr groups and Parquet files, and the storage dtypes
(bf16 as its raw 16-bit pattern, since neither NumPy, Zarr nor Parquet has a bf16 type)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import posixpath
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ldm_core import storage
from ldm_core.data.integrity import CorruptShardError, mismatch, sha256_hex
from ldm_core.data.latent_store.schema import FORMAT, TENSOR_FIELDS, LatentStoreConfig

log = logging.getLogger(__name__)


NP_DTYPE = {"fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16), "fp32": np.dtype(np.float32)}


TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as a NumPy array, shared, without a torch op that computes (bf16, which NumPy lacks,
    seen as int16)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A float tensor as the NumPy array that is written (bf16: its raw bits as uint16)."""
    a = numpy_view(x.detach().to("cpu", TORCH_DTYPE[dtype]).contiguous())
    return a.view(np.uint16) if dtype == "bf16" else a


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of `to_storage`: a tensor of the storage dtype (torch.bfloat16 for bf16), sharing memory."""
    if not a.flags.writeable:
        a = a.copy()  # torch wants writable memory; Arrow buffers are read-only
    if dtype == "bf16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


@dataclass
class ShardColumns:
    """One shard's rows, in store order, ready to write (tensors as NumPy arrays in the storage dtype)."""

    latents: np.ndarray
    """(N, C, h, w): the posterior mean (moments) or one sample, unscaled."""
    logvar: np.ndarray | None
    """(N, C, h, w) posterior log-variance (moments), else None."""
    context: np.ndarray
    """(N, L, D) caption token embeddings."""
    context_mask: np.ndarray
    """(N, L) bool, True for real tokens."""
    rows: pa.Table
    """(N rows) ``id``, ``caption``, ``split`` and attribute columns."""
    pooled: np.ndarray
    """(N, D_pool) pooled caption vectors."""

    def __len__(self) -> int:
        return len(self.latents)

    def tensors(self) -> dict[str, np.ndarray]:
        out = {
            "latents": self.latents,
            "context": self.context,
            "context_mask": self.context_mask,
            "pooled": self.pooled,
        }
        if self.logvar is not None:
            out["logvar"] = self.logvar
        return out

    def take(self, order: np.ndarray) -> ShardColumns:
        lv = None if self.logvar is None else self.logvar[order]
        return ShardColumns(
            self.latents[order],
            lv,
            self.context[order],
            self.context_mask[order],
            self.rows.take(pa.array(order)),
            self.pooled[order],
        )


ROW_COLUMNS = ("id", "caption", "split")


def attribute_names(rows: pa.Table) -> list[str]:
    return [c for c in rows.column_names if c not in ROW_COLUMNS]


Checksums = dict[str, str]
"""File of a shard (its path inside a Zarr group; ``""`` for a one-file Parquet shard) -> sha256 as written."""


def _corrupt(url: str, detail: str) -> CorruptShardError:
    return CorruptShardError(
        "latent store",
        posixpath.basename(url.rstrip("/")),
        url,
        detail,
        "encode the dataset again into a new store URL",
    )


class _ZarrShards:
    """A shard is a Zarr v3 group: one array per tensor field, chunked by ``chunk_rows`` rows and Blosc-compressed,
    plus UTF-8 string arrays for id, caption, split, and ``attributes`` (one JSON object per row)."""

    ext = "zarr"

    @staticmethod
    def _store(url: str, storage_options: dict[str, Any] | None, read_only: bool):
        import zarr.storage

        if storage.is_local(url):
            return zarr.storage.LocalStore(storage.local_path(url), read_only=read_only)
        opts = dict(storage_options or {})
        if storage.protocol_of(url) == "s3":
            # max_concurrency=1: s3fs would otherwise HEAD every chunk before its GET, to decide whether to split
            # it into parallel ranges (only done above 50 MB, far more than a chunk here)
            opts = {**storage.s3_options_from_env(), "max_concurrency": 1, **opts}
        return zarr.storage.FsspecStore.from_url(url, storage_options=opts, read_only=read_only)

    @staticmethod
    def _codec(cfg: LatentStoreConfig, shuffle: str):
        from zarr.codecs import BloscCodec

        if cfg.compression == "none":
            return None
        return BloscCodec(cname=cfg.compression, clevel=cfg.compression_level, shuffle=shuffle)

    def write(
        self, url: str, cols: ShardColumns, cfg: LatentStoreConfig, storage_options: dict[str, Any] | None
    ) -> Checksums:
        """Write the group; return the sha256 of each of its files, as written."""
        if storage.is_local(url):
            self._write_group(storage.local_path(url), cols, cfg)
            return _fsync_and_hash_tree(storage.local_path(url))
        # object store: build the group on local disk, then upload its files concurrently (a few requests in
        # flight instead of one sequential round trip per file of the group)
        with tempfile.TemporaryDirectory(prefix="latent-shard-") as tmp:
            self._write_group(tmp, cols, cfg)
            checksums = _fsync_and_hash_tree(tmp, fsync=False)
            fs, root = storage.get_fs(url, storage_options)
            local = [os.path.join(tmp, *rel.split("/")) for rel in checksums]
            remote = [posixpath.join(root, rel) for rel in checksums]
            with storage.naming_errors(url, "writing the shard"):
                fs.put(local, remote)
        return checksums

    @staticmethod
    def fetch_verified(
        url: str, checksums: Checksums, fields: Sequence[str], storage_options: dict[str, Any] | None
    ) -> dict[str, bytes]:
        """The group's own files and those of ``fields``' arrays, each checked against its recorded sha256
        (`CorruptShardError` at the first that differs or is missing): path in the group -> bytes."""
        wanted = sorted(rel for rel in checksums if "/" not in rel or rel.split("/", 1)[0] in fields)
        fs, root = storage.get_fs(url, storage_options)
        paths = [posixpath.join(root, rel) for rel in wanted]
        with storage.naming_errors(url, "reading the shard"):
            # one concurrent batch of GETs on an object store (exceptions returned, not raised: a missing chunk
            # is corruption, named as such)
            got = fs.cat(paths, on_error="return") if paths else {}
        files = {}
        for rel, path in zip(wanted, paths):
            data = got.get(path, got.get(fs._strip_protocol(path)))
            if data is None or isinstance(data, FileNotFoundError):
                raise _corrupt(url, f"its file {rel} is missing")
            if isinstance(data, BaseException):
                raise data
            if (why := mismatch(data, checksums[rel])) is not None:
                raise _corrupt(url, f"its file {rel}: {why}")
            files[rel] = data
        return files

    def _write_group(self, path: str, cols: ShardColumns, cfg: LatentStoreConfig) -> None:
        import zarr

        group = zarr.open_group(zarr.storage.LocalStore(path), mode="w")
        n = len(cols)
        for name, a in cols.tensors().items():
            # byte shuffle groups the exponent bytes of floats together, which is what makes them compress
            shuffle = "shuffle" if a.dtype.itemsize > 1 else "noshuffle"
            arr = group.create_array(
                name,
                shape=a.shape,
                chunks=(min(cfg.chunk_rows, n), *a.shape[1:]),
                dtype=a.dtype,
                compressors=self._codec(cfg, shuffle),
                fill_value=0,
            )
            arr[...] = a
        attrs = cols.rows.select(attribute_names(cols.rows)).to_pylist()
        strings = {c: cols.rows.column(c).to_pylist() for c in ROW_COLUMNS}
        strings["attributes"] = [json.dumps(a, ensure_ascii=False) for a in attrs]
        for name, values in strings.items():
            arr = group.create_array(
                name, shape=(n,), chunks=(n,), dtype=str, compressors=self._codec(cfg, "noshuffle")
            )
            arr[...] = np.array(values, dtype=object)
        group.attrs.update({"format": FORMAT, "rows": n})
        # Consolidated metadata: a reader learns every array from the group's zarr.json in one GET instead of one
        # per array (on S3 each is a round trip). Not yet in the v3 spec, hence zarr's warning; the per-array
        # zarr.json files stay, so readers that ignore it still work.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(group.store)

    def _read_arrays(
        self,
        url: str,
        fields: Sequence[str],
        storage_options: dict[str, Any] | None,
        checksums: Checksums | None = None,
    ) -> dict[str, np.ndarray]:
        import zarr.api.asynchronous as za
        import zarr.storage
        from zarr.core.buffer import cpu
        from zarr.core.sync import sync

        if checksums is not None:
            # the checked bytes are the ones decoded: a checked read costs a hash, not a second read
            files = self.fetch_verified(url, checksums, fields, storage_options)
            store = zarr.storage.MemoryStore({k: cpu.Buffer.from_bytes(v) for k, v in files.items()}, read_only=True)
        else:
            store = self._store(url, storage_options, read_only=True)

        async def read() -> dict[str, np.ndarray]:
            # all arrays of the shard requested at once: one round trip of latency, not one per array
            group = await za.open_group(store=store, mode="r", zarr_format=3, use_consolidated=True)
            arrays = await asyncio.gather(*(group.getitem(f) for f in fields))
            data = await asyncio.gather(*(a.getitem(slice(None)) for a in arrays))
            return dict(zip(fields, data))

        with storage.naming_errors(url, "reading the shard"):
            return sync(read())

    def read(
        self,
        url: str,
        fields: Sequence[str],
        storage_options: dict[str, Any] | None,
        checksums: Checksums | None = None,
    ) -> dict[str, np.ndarray]:
        """The arrays of ``fields``; with ``checksums``, decoded from their files once these are checked."""
        return self._read_arrays(url, fields, storage_options, checksums)

    def read_rows(
        self, url: str, storage_options: dict[str, Any] | None, checksums: Checksums | None = None
    ) -> list[dict[str, Any]]:
        cols = {
            c: a.tolist() for c, a in self.read(url, (*ROW_COLUMNS, "attributes"), storage_options, checksums).items()
        }
        return [
            {"id": i, "caption": c, "split": s, **json.loads(a)}
            for i, c, s, a in zip(cols["id"], cols["caption"], cols["split"], cols["attributes"])
        ]

    def read_row_table(
        self, url: str, storage_options: dict[str, Any] | None, checksums: Checksums | None = None
    ) -> pa.Table:
        """The rows as a table (attributes are JSON here: a row without one reads as null, as readers see it)."""
        return pa.Table.from_pylist(self.read_rows(url, storage_options, checksums))


class _ParquetShards:
    """A shard is one Parquet file written atomically: id, caption, split and the attribute columns as typed
    columns, and each tensor field as a fixed-size binary column (the row's tensor in C order; dtype and shape in
    the field metadata). Binary cells decode faster than Arrow's half-float lists and are exactly the bytes."""

    ext = "parquet"

    def write(
        self, url: str, cols: ShardColumns, cfg: LatentStoreConfig, storage_options: dict[str, Any] | None
    ) -> Checksums:
        """Write the file; return its sha256 as written (keyed ``""``)."""
        n = len(cols)
        arrays, fields = list(cols.rows.columns), list(cols.rows.schema)
        for name, a in cols.tensors().items():
            a = np.ascontiguousarray(a)
            row_bytes = a[0].nbytes if n else 0
            arrays.append(
                pa.FixedSizeBinaryArray.from_buffers(pa.binary(row_bytes), n, [None, pa.py_buffer(a.tobytes())])
            )
            fields.append(
                pa.field(
                    name, pa.binary(row_bytes), metadata={"dtype": a.dtype.str, "shape": json.dumps(list(a.shape[1:]))}
                )
            )
        table = pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata={"format": FORMAT}))
        buf = io.BytesIO()
        # one row group: a shard is always read whole; no dictionary pages for float bytes
        dictionary = [c for c in cols.rows.column_names if c not in ("id", "caption")]  # repeated values only
        pq.write_table(
            table,
            buf,
            compression=cfg.compression,
            row_group_size=max(n, 1),
            use_dictionary=dictionary,
            **({"compression_level": cfg.compression_level} if cfg.compression == "zstd" else {}),
        )
        data = buf.getvalue()
        storage.write_bytes_atomic(url, data, storage_options)
        return {"": sha256_hex(data)}

    @staticmethod
    def _bytes(url: str, storage_options: dict[str, Any] | None, checksums: Checksums | None) -> bytes:
        # one GET of the whole object: cheaper than Parquet's ranged reads through a high-latency object store, and
        # what the recorded sha256 is checked on (no second read)
        data = storage.read_bytes(url, storage_options)
        if checksums is not None and (why := mismatch(data, checksums[""])) is not None:
            raise _corrupt(url, why)
        return data

    def read(
        self,
        url: str,
        fields: Sequence[str],
        storage_options: dict[str, Any] | None,
        checksums: Checksums | None = None,
    ) -> dict[str, np.ndarray]:
        """The tensors of ``fields``; with ``checksums``, the file is checked against its sha256 first."""
        table = pq.read_table(pa.BufferReader(self._bytes(url, storage_options, checksums)), columns=list(fields))
        out = {}
        for f in fields:
            field = table.schema.field(f)
            dtype = np.dtype(field.metadata[b"dtype"].decode())
            shape = json.loads(field.metadata[b"shape"])
            col = table.column(f).combine_chunks()
            data = np.frombuffer(col.buffers()[1], dtype=np.uint8)
            start = col.offset * col.type.byte_width
            out[f] = data[start : start + len(col) * col.type.byte_width].view(dtype).reshape(len(col), *shape).copy()
        return out

    def read_rows(
        self, url: str, storage_options: dict[str, Any] | None, checksums: Checksums | None = None
    ) -> list[dict[str, Any]]:
        return self.read_row_table(url, storage_options, checksums).to_pylist()

    def read_row_table(
        self, url: str, storage_options: dict[str, Any] | None, checksums: Checksums | None = None
    ) -> pa.Table:
        pf = pq.ParquetFile(pa.BufferReader(self._bytes(url, storage_options, checksums)))
        return pf.read(columns=[c for c in pf.schema_arrow.names if c not in TENSOR_FIELDS])


SHARD_FORMATS: dict[str, _ZarrShards | _ParquetShards] = {"zarr": _ZarrShards(), "parquet": _ParquetShards()}


def _fsync_and_hash_tree(path: str, fsync: bool = True) -> Checksums:
    """The sha256 of every file of a locally written Zarr group, by its path inside the group; ``fsync``: make each
    durable before the metadata names the group (one open per file serves both)."""
    checksums = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                checksums[os.path.relpath(full, path).replace(os.sep, "/")] = sha256_hex(fh.read())
                if fsync:
                    os.fsync(fh.fileno())
    return dict(sorted(checksums.items()))
