"""Encoding a canonical dataset into a latent store: each dataset shard once, by the frozen autoencoder and the
text encoder; resumable (completed shards are skipped) and incremental (a grown dataset gets its new shards)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ldm_core.data import canonical
from ldm_core.data.dataset import image_to_tensor, resize_center_crop
from ldm_core.data.images import decode_rgb
from ldm_core.data.latent_store.backends import NP_DTYPE, ShardColumns, to_storage
from ldm_core.data.latent_store.schema import (
    EncodeProgress,
    EncodeResult,
    EncodeRun,
    LatentStoreConfig,
    LatentStoreMetadata,
    LatentStoreMismatchError,
    StoreShard,
    utc_now,
)
from ldm_core.data.latent_store.writer import LatentStoreWriter
from ldm_core.data.sources import redact_url
from ldm_core.text_encoder import TextEncoder

log = logging.getLogger(__name__)


def _shard_seed(seed: int, source: str) -> int:
    # posterior samples of a shard depend only on (seed, shard): a resumed or incremental run draws the same ones
    return seed * 1_000_003 + (canonical.shard_index(source) or 0)


def _encode_shard(
    table: pa.Table,
    vae: torch.nn.Module,
    text_encoder: TextEncoder,
    config: LatentStoreConfig,
    device: torch.device,
    source: str,
    attribute_columns: list[str],
) -> ShardColumns:
    """One dataset shard's rows -> its store columns. Memory: this shard's images and outputs, nothing more."""
    n = table.num_rows
    c, h, w = vae.config.latent_shape(config.resolution)
    dt = NP_DTYPE[config.dtype]
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
        x = torch.stack(
            [
                image_to_tensor(resize_center_crop(decode_rgb(images[i].as_py()), config.resolution))
                for i in range(start, stop)
            ]
        )  # (b, 3, R, R) in [-1, 1]
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
    text_encoder: TextEncoder,
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
    started, t0 = utc_now(), time.perf_counter()
    if split is not None and split not in canonical.SPLITS:
        raise ValueError(f"split must be one of {canonical.SPLITS} or None, got {split!r}")
    manifest = canonical.read_manifest(dataset_url, storage_options)
    if manifest is None:
        raise FileNotFoundError(f"no {canonical.MANIFEST_NAME} under {dataset_url}: ingest a source there first")
    if not hasattr(vae, "encode") or not hasattr(vae, "config"):
        raise TypeError("encode_dataset needs a KL autoencoder (encode(x) -> posterior with mean and logvar)")
    factor = vae.config.downsample_factor
    if config.resolution % factor:
        raise ValueError(
            f"resolution {config.resolution} is not divisible by the autoencoder's downsampling factor {factor}"
        )
    template = LatentStoreMetadata(
        backend=config.backend,
        dtype=config.dtype,
        content=config.content,
        resolution=config.resolution,
        seed=config.seed,
        compression=config.compression,
        vae_identity=vae_identity,
        scaling_factor=float(vae.config.scaling_factor),
        shift_factor=float(vae.config.shift_factor),
        text_encoder_identity=text_encoder.identity,
        latent_shape=list(vae.config.latent_shape(config.resolution)),
        context_shape=[text_encoder.config.max_length, text_encoder.dim],
        pooled_dim=text_encoder.pooled_dim,
        split=split,
        dataset_url=redact_url(dataset_url),
    )
    empty = text_encoder.empty()
    writer = LatentStoreWriter.open(
        store_url, template, config, (empty.embeddings, empty.mask, empty.pooled), storage_options
    )
    with writer:  # holds the store's writer lease until the last commit
        return _encode_into(
            writer,
            dataset_url,
            store_url,
            manifest,
            vae,
            text_encoder,
            config,
            split=split,
            storage_options=storage_options,
            device=device,
            progress=progress,
            started=started,
            t0=t0,
        )


def _encode_into(
    writer: LatentStoreWriter,
    dataset_url: str,
    store_url: str,
    manifest: canonical.Manifest,
    vae: torch.nn.Module,
    text_encoder: TextEncoder,
    config: LatentStoreConfig,
    *,
    split: str | None,
    storage_options: dict[str, Any] | None,
    device: str | torch.device,
    progress: Callable[[EncodeProgress], None] | None,
    started: str,
    t0: float,
) -> EncodeResult:
    """`encode_dataset` once the store is open (and its lease held): the shards the store does not have yet."""
    done = writer.metadata.shard_by_source()
    _check_same_dataset(done, manifest, dataset_url, store_url)
    todo = [s for s in manifest.shards if s.name not in done]
    log.info(
        "encoding %s -> %s: %d dataset shards, %d already encoded, %d to do",
        redact_url(dataset_url),
        redact_url(store_url),
        len(manifest.shards),
        len(done),
        len(todo),
    )
    device = torch.device(device)
    first_param = next(vae.parameters())
    was_training, home = vae.training, first_param.device
    vae.eval().to(device)
    try:
        records = []
        for i, info in enumerate(todo):
            records.append(
                _encode_source_shard(
                    writer, info, dataset_url, manifest, vae, text_encoder, config, split, device, storage_options
                )
            )
            if progress is not None:
                progress(EncodeProgress(info.name, records[-1].rows, i + 1, len(todo), sum(r.rows for r in records)))
    finally:
        vae.train(was_training).to(home)
    return _finish(writer, store_url, todo, records, len(done), started, t0)


def _check_same_dataset(
    done: dict[str, StoreShard], manifest: canonical.Manifest, dataset_url: str, store_url: str
) -> None:
    """Every shard the store holds encodes a shard of this dataset, of the same rows and size."""
    in_dataset = {s.name: s for s in manifest.shards}
    for source, rec in done.items():
        info = in_dataset.get(source)
        if info is None or info.rows != rec.source_rows or (rec.source_bytes and info.bytes != rec.source_bytes):
            raise LatentStoreMismatchError(
                f"the latent store at {store_url} encodes a {source} that the dataset at {redact_url(dataset_url)} "
                f"does not have ({'missing' if info is None else f'{info.rows} rows, not {rec.source_rows}'}): it "
                "was built from another dataset. Use a new store URL."
            )


def _encode_source_shard(
    writer: LatentStoreWriter,
    info: canonical.ShardInfo,
    dataset_url: str,
    manifest: canonical.Manifest,
    vae: torch.nn.Module,
    text_encoder: TextEncoder,
    config: LatentStoreConfig,
    split: str | None,
    device: torch.device,
    storage_options: dict[str, Any] | None,
) -> StoreShard:
    """Read, encode and record one dataset shard; returns its store record."""
    # the whole file is read anyway: checking it costs one sha256 (a corrupt shard stops the encoding)
    table = canonical.read_shard(dataset_url, info.name, storage_options=storage_options, verify=info)
    if split is not None:
        table = table.filter(pc.equal(table.column("split"), split))
    # encode in store order (train rows first), so a row's batch is the one a reader can reproduce
    table = table.take(pa.array(np.argsort(np.array(table.column("split").to_pylist()) != "train", kind="stable")))
    with torch.inference_mode():
        cols = _encode_shard(table, vae, text_encoder, config, device, info.name, manifest.attribute_columns)
    del table
    record = writer.write_shard(info.name, cols, source_rows=info.rows, source_bytes=info.bytes)
    log.info("encoded %s: %d rows -> %s", info.name, record.rows, record.name)
    return record


def _finish(
    writer: LatentStoreWriter,
    store_url: str,
    encoded: list[canonical.ShardInfo],
    records: list[StoreShard],
    skipped: int,
    started: str,
    t0: float,
) -> EncodeResult:
    """Record the run (when it encoded anything) and say what it did."""
    rows_new = sum(r.rows for r in records)
    seconds = time.perf_counter() - t0
    rate = rows_new / seconds if rows_new else 0.0
    new_shards = [info.name for info in encoded]
    if new_shards:
        writer.record_run(
            EncodeRun(
                started_at=started,
                finished_at=utc_now(),
                shards_new=len(new_shards),
                rows_new=rows_new,
                images_per_second=rate,
            )
        )
    m = writer.metadata
    return EncodeResult(
        store_url=redact_url(store_url),
        rows_total=m.rows,
        rows_new=rows_new,
        train_rows_total=m.train_rows,
        validation_rows_total=m.validation_rows,
        shards_total=len(m.shards),
        shards_new=len(new_shards),
        new_shards=new_shards,
        skipped_shards=skipped,
        bytes_new=sum(r.bytes for r in records),
        seconds=seconds,
        images_per_second=rate,
    )
