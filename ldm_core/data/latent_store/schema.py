"""The latent store's on-disk schema: its file names, the config that builds a store, the metadata that records
what it holds (identities, shapes, complete shards), the null caption, and what an encoding run returns."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ldm_core import storage
from ldm_core.config import StrictModel
from ldm_core.data.sources import redact_url

log = logging.getLogger(__name__)


FORMAT = "ldm-latent-store/2"
"""The format this code writes and reads: every shard holds the pooled caption vectors and has its files' sha256s
recorded, and the null caption has its pooled vector. A store of any other format is refused on open (a store is a
cache of its dataset: encoding it again is the way to this format)."""


METADATA_NAME = "latent_store.json"


UNCOND_NAME = "uncond.safetensors"


SHARDS_DIR = "shards"


SHARD_NAME_RE = re.compile(r"^(?P<stem>.+)-(?P<token>[0-9a-f]{8})\.(?P<ext>zarr|parquet)$")


SHARD_GENERATION_RE = re.compile(r"-g(?P<generation>\d+)-[0-9a-f]{8}\.(zarr|parquet)$")
"""The writer generation in a shard's name (``shard-00000-g3-1a2b3c4d.zarr``)."""


TENSOR_FIELDS = ("latents", "logvar", "context", "context_mask", "pooled")


TRAINING_FIELDS = ("latents", "context", "context_mask", "pooled")
"""What a trainer reads from every store (the UNet leaves ``pooled`` unused; the MMDiT conditions on it)."""


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
    checksums: dict[str, str]
    """sha256 of each file of the shard as written (its path in a Zarr group; ``""`` for a Parquet file): readers
    refuse a shard that changed since (`ldm_core.data.integrity`). Empty for a shard without rows (no files)."""


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
    pooled_dim: int
    """D_pool of one caption's pooled vector, held by every shard and by the null caption."""
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
    writer_generation: int | None = None
    """Incremented by every writer when it takes the store's lease (the fence of `ldm_core.leases`), and part of
    the names of the shards it writes; None only in a template that no writer has opened yet."""

    def shard_by_source(self) -> dict[str, StoreShard]:
        return {s.source: s for s in self.shards}


# Metadata that must agree between an existing store and anything added to it.
IDENTITY_FIELDS = (
    "vae_identity",
    "text_encoder_identity",
    "scaling_factor",
    "shift_factor",
    "latent_shape",
    "context_shape",
    "backend",
    "dtype",
    "content",
    "resolution",
    "split",
)


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


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def metadata_url(store_url: str) -> str:
    return storage.join(store_url, METADATA_NAME)


def read_metadata(store_url: str, storage_options: dict[str, Any] | None = None) -> LatentStoreMetadata | None:
    """The store's metadata, or None when nothing was ever written there."""
    url = metadata_url(store_url)
    if not storage.exists(url, storage_options):
        return None
    return parse_metadata(storage.read_bytes(url, storage_options), url)


class LatentStoreFormatError(ValueError):
    """The store was written in a format this code does not read."""


def parse_metadata(data: bytes, url: str) -> LatentStoreMetadata:
    """``latent_store.json`` (read from ``url``), refused in one line when it is of another format: its format is
    checked before its fields, which another format may lack."""
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None  # not JSON: the validation below says what is wrong with it
    if isinstance(doc, dict) and doc.get("format") != FORMAT:
        store = redact_url(url.removesuffix(METADATA_NAME).rstrip("/"))
        raise LatentStoreFormatError(
            f"latent store at {store} is format {doc.get('format')}; this version reads format {FORMAT}: delete it "
            "and encode the dataset again (encode_dataset; in the pipeline: materialize latent_store)"
        )
    return LatentStoreMetadata.model_validate_json(data)


def metadata_bytes(meta: LatentStoreMetadata) -> bytes:
    return (json.dumps(meta.model_dump(mode="json"), indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def write_metadata(store_url: str, meta: LatentStoreMetadata, storage_options: dict[str, Any] | None) -> None:
    """Unconditionally (tools and tests); `LatentStoreWriter` commits through its writer lease's fence instead."""
    storage.write_bytes_atomic(metadata_url(store_url), metadata_bytes(meta), storage_options)


_UNCOND_KEYS = ("context", "mask", "pooled")


def write_uncond(store_url: str, uncond: Sequence[torch.Tensor], storage_options: dict[str, Any] | None) -> None:
    """The null caption: (context (1, L, D), mask (1, L), pooled (1, D_pool)), fp32 (the mask bool)."""
    tensors = {
        k: (t.detach().bool() if k == "mask" else t.detach().float()).cpu().contiguous()
        for k, t in zip(_UNCOND_KEYS, uncond)
    }
    storage.write_bytes_atomic(storage.join(store_url, UNCOND_NAME), save_safetensors(tensors), storage_options)


def read_uncond(store_url: str, storage_options: dict[str, Any] | None) -> tuple[torch.Tensor, ...]:
    t = load_safetensors(storage.read_bytes(storage.join(store_url, UNCOND_NAME), storage_options))
    return tuple(t[k] for k in _UNCOND_KEYS)
