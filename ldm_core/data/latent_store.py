"""The latent store: every image of a canonical dataset encoded ONCE by the frozen autoencoder, with its caption's
text embeddings, so that diffusion training reads small tensors instead of decoding images every step.

Layout under the store URL (a local path or ``s3://bucket/prefix``)::

    latent_store.json                     the truth: identities, shapes, dtype, and the shards that are complete
    uncond.safetensors                    the empty prompt's embedding (1, L, D), mask (1, L) and pooled vector
                                          (1, D_pool), fp32: the null caption of classifier-free guidance
    shards/shard-00000-1f2e3d4c.zarr/     one Zarr group per dataset shard (backend "zarr"), or
    shards/shard-00000-1f2e3d4c.parquet   one Parquet file per dataset shard (backend "parquet")

One dataset shard becomes one store shard, named after it plus a random token. A shard is written completely
first and recorded in ``latent_store.json`` (written atomically) only afterwards; a shard a killed run left
behind is never named there, so readers ignore it and the next run deletes it and encodes the dataset shard
again. Recorded shards are immutable. This makes `encode_dataset` resumable (completed shards are skipped) and
incremental (a dataset that grew gets only its new shards encoded).

Inside a shard the rows are grouped by split, train rows first: a split is a contiguous row range of every shard,
so a reader builds its index from the metadata alone. Per row: ``latents`` (the posterior mean, or one posterior
sample, unscaled, (C, h, w)), ``logvar`` (moments only), ``context`` (L, D), ``context_mask`` (L,), ``pooled``
(D_pool,: the text encoder's pooled caption vector, `TextEncoder.pooling`), and ``id``, ``caption``, ``split`` and
the dataset's attribute columns. Tensors are stored in the configured dtype (bf16 as its raw 16-bit pattern, since
neither NumPy, Zarr nor Parquet has a bf16 type).

Stores written before pooled vectors were cached (metadata ``pooled_dim`` null, no ``pooled`` field, no pooled
null caption) still load: their readers give no ``pooled``, which the UNet never uses. The next `encode_dataset`
on such a store adds the column (`LatentStoreWriter.add_pooled`): the store's own text encoder encodes the stored
captions, and each shard is rewritten whole under a fresh name and swapped in the metadata; no image is read and
the autoencoder does not run. A killed upgrade resumes with the shards not yet swapped.

The latent scale is NOT applied in the store: the store holds the autoencoder's own latents plus the scale and
shift it was trained with, and readers apply them through `scale_latents`, the one function that maps
autoencoder latents into diffusion space.

One writer at a time per store (no cross-process locking); any number of readers.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import io
import json
import logging
import os
import posixpath
import re
import secrets
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ldm_core import storage
from ldm_core.config import StrictModel
from ldm_core.data import canonical
from ldm_core.data.dataset import image_to_tensor, resize_center_crop
from ldm_core.data.images import decode_rgb
from ldm_core.models.autoencoder import scale_latents, unscale_latents  # noqa: F401  (re-exported: the one place)

if TYPE_CHECKING:
    from ldm_core.text_encoder import TextEncoder

log = logging.getLogger(__name__)

FORMAT = "ldm-latent-store/1"
METADATA_NAME = "latent_store.json"
UNCOND_NAME = "uncond.safetensors"
SHARDS_DIR = "shards"
_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<token>[0-9a-f]{8})\.(?P<ext>zarr|parquet)$")
TENSOR_FIELDS = ("latents", "logvar", "context", "context_mask", "pooled")
TRAINING_FIELDS = ("latents", "context", "context_mask")
"""What a trainer reads from every store; ``pooled`` too where the store has it (`LatentStore.training_fields`)."""


# ---------------------------------------------------------------------------------------------------------------
# Config, metadata and results
# ---------------------------------------------------------------------------------------------------------------


class LatentStoreConfig(StrictModel):
    """How `encode_dataset` builds a latent store."""

    backend: Literal["zarr", "parquet"] = "zarr"
    """Shard format: one Zarr group per shard (Blosc-compressed arrays), or one Parquet file per shard."""
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """Storage dtype of latents and text embeddings (fp16 halves the store; fp32 stores them exactly)."""
    content: Literal["moments", "sample"] = "moments"
    """``moments``: the posterior mean and log-variance (readers return the mean, or draw from the posterior);
    ``sample``: one posterior sample per image, drawn with a generator seeded by ``seed`` and the shard."""
    batch_size: int = Field(64, ge=1)
    """Images per autoencoder forward pass while encoding."""
    resolution: int = Field(256, ge=1)
    """Side of the square image fed to the autoencoder (shorter side resized, centre crop); must be divisible
    by the autoencoder's downsampling factor."""
    seed: int = 0
    """Seeds the posterior samples of ``content="sample"`` (the same store is rebuilt bit for bit)."""
    compression: Literal["zstd", "lz4", "none"] = "zstd"
    """Compressor: Zarr uses Blosc with this codec (byte-shuffled floats), Parquet its own codec of that name."""
    compression_level: int = Field(3, ge=1, le=9)
    """Compression level (higher: smaller and slower to write; decoding speed barely changes)."""
    chunk_rows: int = Field(256, ge=1)
    """Zarr only: rows per chunk. Chunks never span shards; several per shard let readers decode in parallel."""


class _Data(BaseModel):
    # Metadata is data written by this code, read back by (possibly newer) code: unknown keys are tolerated.
    model_config = ConfigDict(extra="ignore")


class StoreShard(_Data):
    """One completed store shard: the encoding of one dataset shard."""

    name: str | None
    """Object under ``shards/`` (None when no row of the dataset shard passed the split filter)."""
    source: str
    """The dataset shard it encodes (``shard-00000.parquet``)."""
    rows: int
    train_rows: int
    """Rows [0, train_rows) are the train split, [train_rows, rows) the validation split."""
    validation_rows: int
    source_rows: int
    """Rows of the dataset shard and its size in bytes: checked on every later run, so a store is never
    extended from a different dataset that happens to use the same shard names."""
    source_bytes: int
    bytes: int
    """Stored bytes of this shard."""
    pooled: bool = False
    """The shard has the ``pooled`` field (False: recorded before pooled vectors were cached; see add_pooled)."""


class EncodeRun(_Data):
    started_at: str
    finished_at: str
    shards_new: int
    rows_new: int
    images_per_second: float


class LatentStoreMetadata(_Data):
    """``latent_store.json``: what produced the latents, how they are stored, and which shards are complete."""

    format: str = FORMAT
    backend: Literal["zarr", "parquet"]
    dtype: Literal["fp16", "bf16", "fp32"]
    content: Literal["moments", "sample"]
    resolution: int
    seed: int
    compression: str = "zstd"
    vae_identity: str
    """Registry version or URI of the autoencoder (``models:/ldm-vae/3``): latents of two VAEs never mix."""
    scaling_factor: float
    """The autoencoder's latent scale; readers apply it with `scale_latents`."""
    shift_factor: float
    text_encoder_identity: str
    latent_shape: list[int]
    """(C, h, w) of one latent."""
    context_shape: list[int]
    """(L, D) of one caption's token embeddings."""
    pooled_dim: int | None = None
    """D_pool of one caption's pooled vector, held by every shard and by the null caption; None: a store written
    before pooled vectors were cached (or one being upgraded: `LatentStoreWriter.add_pooled`)."""
    split: str | None = None
    """The split filter the store was built with (None: every row of the dataset)."""
    dataset_url: str = ""
    """Where the images came from (informational; the shard fingerprints are what is checked)."""
    attribute_columns: list[str] = Field(default_factory=list)
    rows: int = 0
    train_rows: int = 0
    validation_rows: int = 0
    shards: list[StoreShard] = Field(default_factory=list)
    runs: list[EncodeRun] = Field(default_factory=list)
    created_at: str = ""

    def shard_by_source(self) -> dict[str, StoreShard]:
        return {s.source: s for s in self.shards}


# Metadata that must agree between an existing store and anything added to it.
_IDENTITY_FIELDS = ("vae_identity", "text_encoder_identity", "scaling_factor", "shift_factor", "latent_shape",
                    "context_shape", "backend", "dtype", "content", "resolution", "split")


class LatentStoreMismatchError(ValueError):
    """Something would be added to a store that was built by a different autoencoder, text encoder or format."""


class EncodeResult(BaseModel):
    """What one `encode_dataset` call did (``*_total``: the store after the call)."""

    store_url: str
    rows_total: int
    rows_new: int
    train_rows_total: int
    validation_rows_total: int
    shards_total: int
    shards_new: int
    new_shards: list[str]
    """Dataset shards encoded by this call."""
    skipped_shards: int
    """Dataset shards already in the store (from an earlier or an interrupted run)."""
    bytes_new: int
    seconds: float
    images_per_second: float
    """Rows encoded by this call per second of the whole call (read, decode, encode, compress, write)."""
    pooled_rows_added: int = 0
    """Rows of an older store that this call gave a pooled text vector (`LatentStoreWriter.add_pooled`)."""

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


@dataclass(frozen=True)
class EncodeProgress:
    """Passed to ``progress`` after each store shard is recorded."""

    source: str
    rows: int
    shards_done: int
    shards_todo: int
    rows_done: int


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def metadata_url(store_url: str) -> str:
    return storage.join(store_url, METADATA_NAME)


def read_metadata(store_url: str, storage_options: dict[str, Any] | None = None) -> LatentStoreMetadata | None:
    """The store's metadata, or None when nothing was ever written there."""
    url = metadata_url(store_url)
    if not storage.exists(url, storage_options):
        return None
    meta = LatentStoreMetadata.model_validate_json(storage.read_bytes(url, storage_options))
    if meta.format != FORMAT:
        raise ValueError(f"{url}: unknown latent store format {meta.format!r} (this code reads {FORMAT!r})")
    return meta


def _write_metadata(store_url: str, meta: LatentStoreMetadata, storage_options: dict[str, Any] | None) -> None:
    text = json.dumps(meta.model_dump(mode="json"), indent=1, ensure_ascii=False)
    storage.write_text_atomic(metadata_url(store_url), text + "\n", storage_options)


_UNCOND_KEYS = ("context", "mask", "pooled")


def _write_uncond(store_url: str, uncond: Sequence[torch.Tensor], storage_options: dict[str, Any] | None) -> None:
    """The null caption: (context (1, L, D), mask (1, L)[, pooled (1, D_pool)]), fp32 (the mask bool)."""
    tensors = {k: (t.detach().bool() if k == "mask" else t.detach().float()).cpu().contiguous()
               for k, t in zip(_UNCOND_KEYS, uncond)}
    storage.write_bytes_atomic(storage.join(store_url, UNCOND_NAME), save_safetensors(tensors), storage_options)


def _read_uncond(store_url: str, storage_options: dict[str, Any] | None) -> tuple[torch.Tensor, ...]:
    t = load_safetensors(storage.read_bytes(storage.join(store_url, UNCOND_NAME), storage_options))
    return tuple(t[k] for k in _UNCOND_KEYS if k in t)


# ---------------------------------------------------------------------------------------------------------------
# Storage dtypes
# ---------------------------------------------------------------------------------------------------------------

_NP_DTYPE = {"fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16), "fp32": np.dtype(np.float32)}
TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A float tensor as the NumPy array that is written (bf16: its raw bits as uint16)."""
    x = x.detach().to("cpu", TORCH_DTYPE[dtype]).contiguous()
    if dtype == "bf16":
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of `to_storage`: a tensor of the storage dtype (torch.bfloat16 for bf16), sharing memory."""
    if not a.flags.writeable:
        a = a.copy()  # torch wants writable memory; Arrow buffers are read-only
    if dtype == "bf16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# ---------------------------------------------------------------------------------------------------------------
# Shard formats
# ---------------------------------------------------------------------------------------------------------------


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
    pooled: np.ndarray | None = None
    """(N, D_pool) pooled caption vectors; None only for a store without them (metadata pooled_dim None)."""

    def __len__(self) -> int:
        return len(self.latents)

    def tensors(self) -> dict[str, np.ndarray]:
        out = {"latents": self.latents, "context": self.context, "context_mask": self.context_mask}
        if self.logvar is not None:
            out["logvar"] = self.logvar
        if self.pooled is not None:
            out["pooled"] = self.pooled
        return out

    def take(self, order: np.ndarray) -> "ShardColumns":
        lv = None if self.logvar is None else self.logvar[order]
        pooled = None if self.pooled is None else self.pooled[order]
        return ShardColumns(self.latents[order], lv, self.context[order], self.context_mask[order],
                            self.rows.take(pa.array(order)), pooled)


_ROW_COLUMNS = ("id", "caption", "split")


def _attribute_names(rows: pa.Table) -> list[str]:
    return [c for c in rows.column_names if c not in _ROW_COLUMNS]


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

    def write(self, url: str, cols: ShardColumns, cfg: LatentStoreConfig, storage_options: dict[str, Any] | None) -> None:
        if storage.is_local(url):
            self._write_group(storage.local_path(url), cols, cfg)
            _fsync_tree(storage.local_path(url))
            return
        # object store: build the group on local disk, then upload its files concurrently (a few requests in
        # flight instead of ~20 sequential round trips per shard)
        with tempfile.TemporaryDirectory(prefix="latent-shard-") as tmp:
            self._write_group(tmp, cols, cfg)
            fs, root = storage.get_fs(url, storage_options)
            local = [os.path.join(d, f) for d, _, files in os.walk(tmp) for f in files]
            remote = [posixpath.join(root, os.path.relpath(p, tmp).replace(os.sep, "/")) for p in local]
            with storage.naming_errors(url, "writing the shard"):
                fs.put(local, remote)

    def _write_group(self, path: str, cols: ShardColumns, cfg: LatentStoreConfig) -> None:
        import zarr

        group = zarr.open_group(zarr.storage.LocalStore(path), mode="w")
        n = len(cols)
        for name, a in cols.tensors().items():
            # byte shuffle groups the exponent bytes of floats together, which is what makes them compress
            shuffle = "shuffle" if a.dtype.itemsize > 1 else "noshuffle"
            arr = group.create_array(name, shape=a.shape, chunks=(min(cfg.chunk_rows, n), *a.shape[1:]),
                                     dtype=a.dtype, compressors=self._codec(cfg, shuffle), fill_value=0)
            arr[...] = a
        attrs = cols.rows.select(_attribute_names(cols.rows)).to_pylist()
        strings = {c: cols.rows.column(c).to_pylist() for c in _ROW_COLUMNS}
        strings["attributes"] = [json.dumps(a, ensure_ascii=False) for a in attrs]
        for name, values in strings.items():
            arr = group.create_array(name, shape=(n,), chunks=(n,), dtype=str, compressors=self._codec(cfg, "noshuffle"))
            arr[...] = np.array(values, dtype=object)
        group.attrs.update({"format": FORMAT, "rows": n})
        # Consolidated metadata: a reader learns every array from the group's zarr.json in one GET instead of one
        # per array (on S3 each is a round trip). Not yet in the v3 spec, hence zarr's warning; the per-array
        # zarr.json files stay, so readers that ignore it still work.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(group.store)

    def _read_arrays(self, url: str, fields: Sequence[str], storage_options: dict[str, Any] | None) -> dict[str, np.ndarray]:
        import zarr.api.asynchronous as za
        from zarr.core.sync import sync

        store = self._store(url, storage_options, read_only=True)

        async def read() -> dict[str, np.ndarray]:
            # all arrays of the shard requested at once: one round trip of latency, not one per array
            group = await za.open_group(store=store, mode="r", zarr_format=3, use_consolidated=True)
            arrays = await asyncio.gather(*(group.getitem(f) for f in fields))
            data = await asyncio.gather(*(a.getitem(slice(None)) for a in arrays))
            return dict(zip(fields, data))

        with storage.naming_errors(url, "reading the shard"):
            return sync(read())

    def read(self, url: str, fields: Sequence[str], storage_options: dict[str, Any] | None) -> dict[str, np.ndarray]:
        return self._read_arrays(url, fields, storage_options)

    def read_rows(self, url: str, storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
        cols = {c: a.tolist() for c, a in self._read_arrays(url, (*_ROW_COLUMNS, "attributes"), storage_options).items()}
        return [{"id": i, "caption": c, "split": s, **json.loads(a)}
                for i, c, s, a in zip(cols["id"], cols["caption"], cols["split"], cols["attributes"])]

    def read_row_table(self, url: str, storage_options: dict[str, Any] | None) -> pa.Table:
        """The rows as a table (attributes are JSON here: a row without one reads as null, as readers see it)."""
        return pa.Table.from_pylist(self.read_rows(url, storage_options))


class _ParquetShards:
    """A shard is one Parquet file written atomically: id, caption, split and the attribute columns as typed
    columns, and each tensor field as a fixed-size binary column (the row's tensor in C order; dtype and shape in
    the field metadata). Binary cells decode ~4× faster than Arrow's half-float lists and are exactly the bytes."""

    ext = "parquet"

    def write(self, url: str, cols: ShardColumns, cfg: LatentStoreConfig, storage_options: dict[str, Any] | None) -> None:
        n = len(cols)
        arrays, fields = list(cols.rows.columns), list(cols.rows.schema)
        for name, a in cols.tensors().items():
            a = np.ascontiguousarray(a)
            row_bytes = a[0].nbytes if n else 0
            arrays.append(pa.FixedSizeBinaryArray.from_buffers(pa.binary(row_bytes), n, [None, pa.py_buffer(a.tobytes())]))
            fields.append(pa.field(name, pa.binary(row_bytes),
                                   metadata={"dtype": a.dtype.str, "shape": json.dumps(list(a.shape[1:]))}))
        table = pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata={"format": FORMAT}))
        buf = io.BytesIO()
        # one row group: a shard is always read whole; no dictionary pages for float bytes
        dictionary = [c for c in cols.rows.column_names if c not in ("id", "caption")]  # repeated values only
        pq.write_table(table, buf, compression=cfg.compression, row_group_size=max(n, 1), use_dictionary=dictionary,
                       **({"compression_level": cfg.compression_level} if cfg.compression == "zstd" else {}))
        storage.write_bytes_atomic(url, buf.getvalue(), storage_options)

    @staticmethod
    def _table(url: str, columns: Sequence[str] | None, storage_options: dict[str, Any] | None) -> pa.Table:
        # one GET of the whole object: cheaper than Parquet's ranged reads through a high-latency object store
        return pq.read_table(pa.BufferReader(storage.read_bytes(url, storage_options)), columns=columns)

    def read(self, url: str, fields: Sequence[str], storage_options: dict[str, Any] | None) -> dict[str, np.ndarray]:
        table = self._table(url, list(fields), storage_options)
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

    def read_rows(self, url: str, storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
        return self.read_row_table(url, storage_options).to_pylist()

    def read_row_table(self, url: str, storage_options: dict[str, Any] | None) -> pa.Table:
        pf = pq.ParquetFile(pa.BufferReader(storage.read_bytes(url, storage_options)))
        return pf.read(columns=[c for c in pf.schema_arrow.names if c not in TENSOR_FIELDS])


_FORMATS: dict[str, _ZarrShards | _ParquetShards] = {"zarr": _ZarrShards(), "parquet": _ParquetShards()}


def _fsync_tree(path: str) -> None:
    """Make a locally written Zarr group durable before the metadata names it (one fsync per file)."""
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# Writer: atomic shards, then the metadata
# ---------------------------------------------------------------------------------------------------------------


class LatentStoreWriter:
    """Adds shards to a store: each is written in full under a fresh name, then recorded in the metadata.

    `encode_dataset` uses it; so can anything that produces latents some other way (the loader benchmark writes
    random tensors through it). ``open`` creates the store, or checks that an existing one was built by the same
    autoencoder, text encoder and format.
    """

    def __init__(self, store_url: str, metadata: LatentStoreMetadata, config: LatentStoreConfig,
                 storage_options: dict[str, Any] | None = None):
        self.url, self.metadata, self.config, self.storage_options = store_url, metadata, config, storage_options
        self.format = _FORMATS[metadata.backend]

    @classmethod
    def open(cls, store_url: str, template: LatentStoreMetadata, config: LatentStoreConfig,
             uncond: tuple[torch.Tensor, ...],
             storage_options: dict[str, Any] | None = None) -> "LatentStoreWriter":
        """Open ``store_url`` for adding shards described by ``template`` (identities, shapes, format; no shards).

        uncond: the empty prompt's (context (1, L, D), mask (1, L), pooled (1, D_pool)), written when the store is
        created; pooled is left out exactly when ``template.pooled_dim`` is None (a store without pooled vectors).
        An existing store without pooled vectors stays so until `add_pooled`.
        """
        if (len(uncond) == 3) != (template.pooled_dim is not None):
            raise ValueError(f"uncond must be (context, mask, pooled) when pooled_dim is set, (context, mask) when "
                             f"it is None; got {len(uncond)} tensors for pooled_dim={template.pooled_dim}")
        existing = read_metadata(store_url, storage_options)
        if existing is None:
            storage.makedirs(store_url, storage_options)
            _write_uncond(store_url, uncond, storage_options)
            meta = template.model_copy(deep=True, update={"created_at": _now(), "shards": [], "runs": []})
            _write_metadata(store_url, meta, storage_options)  # identities are fixed from the first moment on
        else:
            _check_compatible(store_url, existing, template)
            meta = existing
        writer = cls(store_url, meta, config, storage_options)
        writer.remove_orphans()
        return writer

    def shard_url(self, name: str) -> str:
        return storage.join(self.url, SHARDS_DIR, name)

    def _new_shard_name(self, source: str) -> str:
        return f"{posixpath.splitext(source)[0]}-{secrets.token_hex(4)}.{self.format.ext}"

    def remove_orphans(self) -> list[str]:
        """Delete shard objects the metadata does not name (left by a run killed before recording them)."""
        known = {s.name for s in self.metadata.shards if s.name}
        removed = []
        for name in storage.list_dir(storage.join(self.url, SHARDS_DIR), self.storage_options):
            if _SHARD_RE.match(name) and name not in known:
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
        clash = [c for c in _attribute_names(cols.rows) if c in TENSOR_FIELDS]
        if clash:
            cols.rows = cols.rows.rename_columns([canonical.ATTRIBUTE_CLASH_PREFIX + c if c in clash else c
                                                  for c in cols.rows.column_names])
        splits = np.array(cols.rows.column("split").to_pylist(), dtype=object)
        if not set(splits) <= set(canonical.SPLITS):
            raise ValueError(f"split values must be in {canonical.SPLITS}, got {sorted(set(splits))}")
        order = np.argsort(splits != "train", kind="stable")  # train rows first, each group in its original order
        if not np.array_equal(order, np.arange(n)):
            cols = cols.take(order)
        n_train = int((splits == "train").sum())
        name, nbytes = None, 0
        if n:
            name = self._new_shard_name(source)
            url = self.shard_url(name)
            self.format.write(url, cols, self.config, self.storage_options)
            nbytes = _size_of(url, self.storage_options)
        record = StoreShard(name=name, source=source, rows=n, train_rows=n_train, validation_rows=n - n_train,
                            source_rows=source_rows, source_bytes=source_bytes, bytes=nbytes,
                            pooled=cols.pooled is not None)
        meta.shards.append(record)
        meta.rows += n
        meta.train_rows += n_train
        meta.validation_rows += n - n_train
        for a in _attribute_names(cols.rows):
            if a not in meta.attribute_columns:
                meta.attribute_columns.append(a)
        # the metadata follows the shard: a reader never sees a record of a shard that is not all there
        _write_metadata(self.url, meta, self.storage_options)
        return record

    def record_run(self, run: EncodeRun) -> None:
        self.metadata.runs.append(run)
        _write_metadata(self.url, self.metadata, self.storage_options)

    def add_pooled(self, text_encoder: TextEncoder, progress: Callable[[int, int], None] | None = None) -> int:
        """Give a store written before pooled vectors were cached (``pooled_dim`` None) its ``pooled`` field and a
        pooled null caption, from the stored captions through ``text_encoder`` (the one that encoded the store, by
        identity). Each shard is rewritten whole under a fresh name, then swapped in the metadata, then the old one
        is removed, so readers only ever see complete shards and a killed run resumes with the shards left.
        progress(shards_done, shards_todo) after each. Returns the rows given a vector (0 when there was nothing
        to do)."""
        meta = self.metadata
        if meta.pooled_dim is not None:
            return 0
        if text_encoder.identity != meta.text_encoder_identity:
            raise LatentStoreMismatchError(
                f"the latent store at {self.url} holds text embeddings of {meta.text_encoder_identity!r}; its pooled "
                f"vectors cannot come from {text_encoder.identity!r}. Encode into a new store URL.")
        fields = ("latents", "context", "context_mask") + (("logvar",) if meta.content == "moments" else ())
        todo = [i for i, s in enumerate(meta.shards) if not s.pooled]
        log.info("adding pooled text vectors to %d shard(s) of %s (written before they were cached)", len(todo),
                 _redact(self.url))
        rows_done = 0
        for done, i in enumerate(todo, 1):
            record = meta.shards[i]
            old_name = record.name
            if old_name is not None:  # (an empty shard has no object: it only needs its flag)
                old_url = self.shard_url(old_name)
                arrays = self.format.read(old_url, fields, self.storage_options)
                rows = self.format.read_row_table(old_url, self.storage_options)
                pooled = text_encoder.encode(rows.column("caption").to_pylist()).pooled  # (N, D_pool)
                cols = ShardColumns(arrays["latents"], arrays.get("logvar"), arrays["context"], arrays["context_mask"],
                                    rows, to_storage(pooled.float(), meta.dtype))
                name = self._new_shard_name(record.source)
                self.format.write(self.shard_url(name), cols, self.config, self.storage_options)
                record = record.model_copy(update={"name": name, "bytes": _size_of(self.shard_url(name),
                                                                                   self.storage_options)})
                rows_done += record.rows
            meta.shards[i] = record.model_copy(update={"pooled": True})
            _write_metadata(self.url, meta, self.storage_options)  # the swap: readers now open the new shard
            if old_name is not None:
                storage.remove(old_url, self.storage_options, recursive=True)
            if progress is not None:
                progress(done, len(todo))
        context, mask = _read_uncond(self.url, self.storage_options)[:2]
        _write_uncond(self.url, (context, mask, text_encoder.empty().pooled), self.storage_options)
        meta.pooled_dim = text_encoder.pooled_dim  # last: from here on readers see (and read) the pooled field
        _write_metadata(self.url, meta, self.storage_options)
        return rows_done

    def _check_shapes(self, cols: ShardColumns) -> None:
        m, n = self.metadata, len(cols)
        want = {"latents": (n, *m.latent_shape), "context": (n, *m.context_shape), "context_mask": (n, m.context_shape[0])}
        if m.content == "moments":
            want["logvar"] = (n, *m.latent_shape)
        if m.pooled_dim is not None:
            want["pooled"] = (n, m.pooled_dim)
        got = cols.tensors()
        if set(got) != set(want):
            raise ValueError(f"a {m.content} store needs fields {sorted(want)}, got {sorted(got)}")
        for k, shape in want.items():
            expected = np.dtype(bool) if k == "context_mask" else _NP_DTYPE[m.dtype]
            if tuple(got[k].shape) != shape or got[k].dtype != expected:
                raise ValueError(f"{k}: expected {shape} {expected}, got {tuple(got[k].shape)} {got[k].dtype}")
        if cols.rows.num_rows != n or not set(_ROW_COLUMNS) <= set(cols.rows.column_names):
            raise ValueError(f"rows must be a table of {n} rows with columns {_ROW_COLUMNS} (+ attributes)")


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
    fields = list(_IDENTITY_FIELDS) + (["seed"] if existing.content == "sample" else [])
    if existing.pooled_dim is not None:  # (a store without pooled vectors gets them from add_pooled)
        fields.append("pooled_dim")
    diffs = {f: (getattr(existing, f), getattr(new, f)) for f in fields if getattr(existing, f) != getattr(new, f)}
    if diffs:
        detail = "; ".join(f"{f}: store has {a!r}, this run {b!r}" for f, (a, b) in diffs.items())
        raise LatentStoreMismatchError(f"the latent store at {store_url} was built differently ({detail}). "
                                       "Use the store's settings or a new store URL.")


# ---------------------------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------------------------


class LatentStore:
    """An encoded store, opened for reading. Shards are numbered 0… in metadata order (empty ones skipped);
    rows are numbered globally, shard by shard, train rows before validation rows within each shard.

    ``read_shard(k)`` gives tensors in the storage dtype, unscaled; `LatentDataset` is the fast, cached,
    training-ready view (scaled latents, float32).
    """

    def __init__(self, store_url: str, storage_options: dict[str, Any] | None = None):
        self.url, self.storage_options = store_url, storage_options
        meta = read_metadata(store_url, storage_options)
        if meta is None:
            raise FileNotFoundError(f"no {METADATA_NAME} under {store_url}: encode a dataset there first")
        self.metadata = meta
        self.format = _FORMATS[meta.backend]
        self.shards: list[StoreShard] = [s for s in meta.shards if s.rows > 0]
        self.offsets = np.cumsum([0] + [s.rows for s in self.shards])
        self._uncond: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.num_rows

    @property
    def scale(self) -> tuple[float, float]:
        """(scaling_factor, shift_factor) for `scale_latents` / `unscale_latents`."""
        return self.metadata.scaling_factor, self.metadata.shift_factor

    @property
    def has_pooled(self) -> bool:
        """Every row and the null caption have a pooled vector (False: a store written before they were cached)."""
        return self.metadata.pooled_dim is not None

    @property
    def training_fields(self) -> tuple[str, ...]:
        """The fields a trainer reads: latents, context, context_mask, and pooled where the store has it."""
        return TRAINING_FIELDS + (("pooled",) if self.has_pooled else ())

    @property
    def tensor_fields(self) -> tuple[str, ...]:
        """Every tensor field this store holds."""
        return self.training_fields + (("logvar",) if self.metadata.content == "moments" else ())

    def uncond(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The empty prompt: (context (1, L, D) float32, mask (1, L) bool, pooled (1, D_pool) float32), for
        classifier-free guidance training; pooled is None in a store without pooled vectors."""
        if self._uncond is None:
            context, mask, *pooled = _read_uncond(self.url, self.storage_options)
            self._uncond = (context, mask, pooled[0] if pooled and self.has_pooled else None)
        return self._uncond

    def shard_url(self, k: int) -> str:
        return storage.join(self.url, SHARDS_DIR, self.shards[k].name)

    def read_shard(self, k: int, fields: Sequence[str] = TRAINING_FIELDS) -> dict[str, torch.Tensor]:
        """Tensors of shard ``k``, storage dtype, unscaled: latents/logvar (N, C, h, w), context (N, L, D),
        context_mask (N, L) bool, pooled (N, D_pool)."""
        if "logvar" in fields and self.metadata.content != "moments":
            raise ValueError("this store holds posterior samples, not moments: it has no logvar")
        if "pooled" in fields and not self.has_pooled:
            raise ValueError(f"the latent store at {_redact(self.url)} was written before pooled text vectors were "
                             "cached: it has no pooled field (encode_dataset on it adds one)")
        arrays = self.format.read(self.shard_url(k), fields, self.storage_options)
        return {f: torch.from_numpy(a) if f == "context_mask" else from_storage(a, self.metadata.dtype)
                for f, a in arrays.items()}

    def read_rows(self, k: int) -> list[dict[str, Any]]:
        """id, caption, split and every attribute column (None where a shard lacks one) of shard ``k``'s rows."""
        rows = self.format.read_rows(self.shard_url(k), self.storage_options)
        for r in rows:
            for a in self.metadata.attribute_columns:
                r.setdefault(a, None)
        return rows

    def locate(self, i: int) -> tuple[int, int]:
        """Global row ``i`` -> (shard, row within the shard)."""
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} out of range for a store of {self.num_rows} rows")
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return k, i - int(self.offsets[k])

    def row(self, i: int) -> dict[str, Any]:
        """Everything stored for global row ``i`` (reads its shard; use `LatentDataset` for repeated access)."""
        k, j = self.locate(i)
        tensors = self.read_shard(k, self.tensor_fields)
        return {**self.read_rows(k)[j], **{f: t[j] for f, t in tensors.items()}}


# ---------------------------------------------------------------------------------------------------------------
# Encoding a canonical dataset
# ---------------------------------------------------------------------------------------------------------------


def _shard_seed(seed: int, source: str) -> int:
    # posterior samples of a shard depend only on (seed, shard): a resumed or incremental run draws the same ones
    return seed * 1_000_003 + (canonical.shard_index(source) or 0)


def _encode_shard(table: pa.Table, vae: torch.nn.Module, text_encoder: "TextEncoder", config: LatentStoreConfig,
                  device: torch.device, source: str, attribute_columns: list[str]) -> ShardColumns:
    """One dataset shard's rows -> its store columns. Memory: this shard's images and outputs, nothing more."""
    n = table.num_rows
    c, h, w = vae.config.latent_shape(config.resolution)
    dt = _NP_DTYPE[config.dtype]
    L = text_encoder.config.max_length
    latents = np.empty((n, c, h, w), dt)
    logvar = np.empty((n, c, h, w), dt) if config.content == "moments" else None
    context = np.empty((n, L, text_encoder.dim), dt)
    mask = np.empty((n, L), bool)
    pooled = np.empty((n, text_encoder.pooled_dim), dt)
    gen = torch.Generator().manual_seed(_shard_seed(config.seed, source))
    vae_dtype = next(vae.parameters()).dtype
    images, captions = table.column("image"), table.column("caption").to_pylist()
    for start in range(0, n, config.batch_size):
        stop = min(start + config.batch_size, n)
        x = torch.stack([image_to_tensor(resize_center_crop(decode_rgb(images[i].as_py()), config.resolution))
                         for i in range(start, stop)])  # (b, 3, R, R) in [-1, 1]
        posterior = vae.encode(x.to(device, vae_dtype))
        mean = posterior.mean.float()  # (b, C, h, w)
        if config.content == "moments":
            latents[start:stop] = to_storage(mean, config.dtype)
            logvar[start:stop] = to_storage(posterior.logvar.float(), config.dtype)
        else:
            # noise drawn on the CPU generator: the same sample on every device
            eps = torch.randn(mean.shape, generator=gen).to(mean.device)
            latents[start:stop] = to_storage(mean + torch.exp(0.5 * posterior.logvar.float()) * eps, config.dtype)
        text = text_encoder.encode(captions[start:stop])
        context[start:stop] = to_storage(text.embeddings.float(), config.dtype)  # (b, L, D)
        mask[start:stop] = text.mask.cpu().numpy()
        pooled[start:stop] = to_storage(text.pooled.float(), config.dtype)  # (b, D_pool)
    present = [a for a in attribute_columns if a in table.column_names]
    rows = table.select(["id", "caption", "split", *present])
    return ShardColumns(latents, logvar, context, mask, rows, pooled)


def encode_dataset(
    dataset_url: str,
    store_url: str,
    vae: torch.nn.Module,
    text_encoder: "TextEncoder",
    config: LatentStoreConfig,
    *,
    vae_identity: str,
    split: str | None = None,
    storage_options: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[EncodeProgress], None] | None = None,
) -> EncodeResult:
    """Encode every dataset shard not yet in the store (all of them the first time), one shard at a time.

    vae: the frozen AutoencoderKL (moved to ``device`` for the call, put back afterwards); its config gives the
    latent scale and shift recorded in the store. text_encoder: the frozen `TextEncoder` (runs on its own device).
    vae_identity: the autoencoder's registry version or URI (``models:/ldm-vae/3``); a store is never extended
    with latents of another identity (`LatentStoreMismatchError`). split: encode only that split's rows.
    storage_options: fsspec options for both the dataset and the store. progress: called after each shard is
    recorded (an exception raised there stops the run; completed shards stay, and a rerun resumes after them).
    """
    started, t0 = _now(), time.perf_counter()
    if split is not None and split not in canonical.SPLITS:
        raise ValueError(f"split must be one of {canonical.SPLITS} or None, got {split!r}")
    manifest = canonical.read_manifest(dataset_url, storage_options)
    if manifest is None:
        raise FileNotFoundError(f"no {canonical.MANIFEST_NAME} under {dataset_url}: ingest a source there first")
    if not hasattr(vae, "encode") or not hasattr(vae, "config"):
        raise TypeError("encode_dataset needs a KL autoencoder (encode(x) -> posterior with mean and logvar)")
    factor = vae.config.downsample_factor
    if config.resolution % factor:
        raise ValueError(f"resolution {config.resolution} is not divisible by the autoencoder's downsampling "
                         f"factor {factor}")
    template = LatentStoreMetadata(
        backend=config.backend, dtype=config.dtype, content=config.content, resolution=config.resolution,
        seed=config.seed, compression=config.compression, vae_identity=vae_identity,
        scaling_factor=float(vae.config.scaling_factor), shift_factor=float(vae.config.shift_factor),
        text_encoder_identity=text_encoder.identity, latent_shape=list(vae.config.latent_shape(config.resolution)),
        context_shape=[text_encoder.config.max_length, text_encoder.dim], pooled_dim=text_encoder.pooled_dim,
        split=split, dataset_url=_redact(dataset_url),
    )
    empty = text_encoder.empty()
    writer = LatentStoreWriter.open(store_url, template, config, (empty.embeddings, empty.mask, empty.pooled),
                                    storage_options)
    # a store written before pooled vectors were cached gets them first, so that every shard is alike afterwards
    pooled_rows_added = writer.add_pooled(text_encoder)

    done = writer.metadata.shard_by_source()
    in_dataset = {s.name: s for s in manifest.shards}
    for source, rec in done.items():
        info = in_dataset.get(source)
        if info is None or info.rows != rec.source_rows or (rec.source_bytes and info.bytes != rec.source_bytes):
            raise LatentStoreMismatchError(
                f"the latent store at {store_url} encodes a {source} that the dataset at {_redact(dataset_url)} "
                f"does not have ({'missing' if info is None else f'{info.rows} rows, not {rec.source_rows}'}): it "
                "was built from another dataset. Use a new store URL.")
    todo = [s for s in manifest.shards if s.name not in done]
    log.info("encoding %s -> %s: %d dataset shards, %d already encoded, %d to do", _redact(dataset_url),
             _redact(store_url), len(manifest.shards), len(done), len(todo))

    device = torch.device(device)
    first_param = next(vae.parameters())
    was_training, home = vae.training, first_param.device
    vae.eval().to(device)
    rows_new = bytes_new = 0
    new_shards: list[str] = []
    try:
        for i, info in enumerate(todo):
            table = canonical.read_shard(dataset_url, info.name, storage_options=storage_options)
            if split is not None:
                table = table.filter(pc.equal(table.column("split"), split))
            # encode in store order (train rows first), so a row's batch is the one a reader can reproduce
            table = table.take(pa.array(np.argsort(np.array(table.column("split").to_pylist()) != "train", kind="stable")))
            with torch.inference_mode():
                cols = _encode_shard(table, vae, text_encoder, config, device, info.name, manifest.attribute_columns)
            del table
            record = writer.write_shard(info.name, cols, source_rows=info.rows, source_bytes=info.bytes)
            del cols
            rows_new += record.rows
            bytes_new += record.bytes
            new_shards.append(info.name)
            log.info("encoded %s: %d rows -> %s", info.name, record.rows, record.name)
            if progress is not None:
                progress(EncodeProgress(info.name, record.rows, i + 1, len(todo), rows_new))
    finally:
        vae.train(was_training).to(home)

    seconds = time.perf_counter() - t0
    rate = rows_new / seconds if rows_new else 0.0
    if new_shards:
        writer.record_run(EncodeRun(started_at=started, finished_at=_now(), shards_new=len(new_shards),
                                    rows_new=rows_new, images_per_second=rate))
    m = writer.metadata
    return EncodeResult(
        store_url=_redact(store_url), rows_total=m.rows, rows_new=rows_new, train_rows_total=m.train_rows,
        validation_rows_total=m.validation_rows, shards_total=len(m.shards), shards_new=len(new_shards),
        new_shards=new_shards, skipped_shards=len(done), bytes_new=bytes_new, seconds=seconds, images_per_second=rate,
        pooled_rows_added=pooled_rows_added,
    )


def _redact(url: str) -> str:
    from ldm_core.data.sources import redact_url

    return redact_url(url)


__all__ = [
    "EncodeProgress", "EncodeResult", "LatentStore", "LatentStoreConfig", "LatentStoreMetadata",
    "LatentStoreMismatchError", "LatentStoreWriter", "ShardColumns", "StoreShard", "encode_dataset", "read_metadata",
    "scale_latents", "unscale_latents",
]
