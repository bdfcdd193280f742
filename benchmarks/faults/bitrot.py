"""Section 8 of the fault campaign: bit rot. A dataset shard or a latent store shard (Zarr, Parquet) changed on disk
after it was written — a flipped bit at a random place, a truncation, a file replaced by another valid one, a
missing Zarr chunk — is refused by every reader with an error naming that shard; a clean copy reads whole; and what
the check costs a training process (its first, cold load of a store with realistic row sizes, checked against
unchecked)."""

from __future__ import annotations

import os
import random
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from benchmarks.faults.table import Row, row
from benchmarks.latent_loader import SD, build_random_store
from ldm_core.data import ImageShardDataset, IngestConfig, canonical, ingest, write_shapes_source
from ldm_core.data.integrity import CorruptShardError
from ldm_core.data.latent_dataset import LatentDataset
from ldm_core.data.latent_store import schema
from ldm_core.data.latent_store.encoding import encode_dataset
from ldm_core.data.latent_store.reader import LatentStore
from ldm_core.data.latent_store.schema import LatentStoreConfig
from ldm_core.models.autoencoder import AutoencoderKL, autoencoder_preset
from ldm_core.text_encoder import TextEncoder, TextEncoderConfig

TRIALS = 3  # per kind of rot, each at a random shard and offset
SHARDS = 4
OVERHEAD_ROWS = 512  # of the SD-like row size (4×64×64 latents and logvar, 77×768 context, fp16): ≈ 90 MB
OVERHEAD_REPS = 3


def _rot(path: str, kind: str, donor: str, rng: random.Random) -> None:
    data = bytearray(Path(path).read_bytes())
    if kind == "flip":
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        Path(path).write_bytes(bytes(data))
    elif kind == "truncate":
        Path(path).write_bytes(bytes(data[: rng.randrange(len(data))]))
    elif kind == "replace":
        shutil.copyfile(donor, path)
    elif kind == "missing":
        os.remove(path)
    else:
        raise ValueError(kind)


def _refused(name: str, read: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """True when ``read(*args, **kwargs)`` raises a CorruptShardError naming shard ``name`` (any other outcome,
    another error included, is a miss)."""
    try:
        read(*args, **kwargs)
    except CorruptShardError as e:
        return e.name == name and name in str(e)
    return False


def _read_dataset(url: str) -> None:
    ds = ImageShardDataset(url, split=None)
    for i in range(len(ds)):
        ds[i]


def _read_store(url: str, resident: bool) -> None:
    ds = LatentDataset(url, split=None, max_cache_bytes=2**40 if resident else 1, prefetch=2)
    try:
        ds.get_batch(list(range(len(ds))))
        ds.rows(list(range(len(ds))))
    finally:
        ds.close()


def _build(root: Path) -> tuple[str, dict[str, str], tuple[Any, Any]]:
    write_shapes_source(str(root / "src"), 10 * SHARDS, seed=0)
    ds = str(root / "ds")
    ingest(IngestConfig(source=str(root / "src"), rows_per_shard=10, val_fraction=0.25), ds)
    torch.manual_seed(0)
    models = AutoencoderKL(autoencoder_preset("tiny")).eval(), TextEncoder(TextEncoderConfig(max_length=8))
    stores = {}
    for backend in ("zarr", "parquet"):
        stores[backend] = str(root / backend)
        encode_dataset(
            ds,
            stores[backend],
            *models,
            LatentStoreConfig(resolution=32, batch_size=8, backend=backend),
            vae_identity="bench:tiny",
            split=None,
        )
    return ds, stores, models


def _dataset_rows(root: Path, clean: str, models: tuple[Any, Any], rng: random.Random) -> tuple[list[Row], Any]:
    rows, details = [], {}
    for kind in ("flip", "truncate", "replace"):
        t0, survived, notes = time.monotonic(), 0, []
        for trial in range(TRIALS):
            url = str(root / f"ds-{kind}-{trial}")
            shutil.copytree(clean, url)
            k = rng.randrange(SHARDS)
            name = canonical.shard_name(k)
            _rot(os.path.join(url, name), kind, os.path.join(url, canonical.shard_name((k + 1) % SHARDS)), rng)
            store = str(root / f"ds-{kind}-{trial}-store")
            by_dataset = _refused(name, _read_dataset, url)
            by_encoder = _refused(
                name,
                encode_dataset,
                url,
                store,
                *models,
                LatentStoreConfig(resolution=32, batch_size=8),
                vae_identity="bench:tiny",
                split=None,
            )
            meta = schema.read_metadata(store)
            kept_out = meta is None or name not in {s.source for s in meta.shards}
            survived += by_dataset and by_encoder and kept_out
            notes.append(
                f"{name}: dataset {'refused' if by_dataset else 'MISSED'}, encoder "
                f"{'refused' if by_encoder else 'MISSED'}"
            )
        details[kind] = notes
        rows.append(
            row(
                "bit rot",
                f"dataset shard {kind} -> ImageShardDataset, encode_dataset",
                TRIALS,
                TRIALS,
                survived,
                f"{survived}/{TRIALS} refused by both, naming the shard",
                time.monotonic() - t0,
            )
        )
    return rows, details


def _store_rows(root: Path, stores: dict[str, str], rng: random.Random) -> tuple[list[Row], Any]:
    rows, details = [], {}
    kinds = {"zarr": ("flip", "truncate", "replace", "missing"), "parquet": ("flip", "truncate", "replace")}
    for backend, clean in stores.items():
        for kind in kinds[backend]:
            t0, survived, notes = time.monotonic(), 0, []
            for trial in range(TRIALS):
                url = str(root / f"{backend}-{kind}-{trial}")
                shutil.copytree(clean, url)
                shards = [s.name for s in schema.read_metadata(url).shards]
                k = rng.randrange(len(shards))
                name, donor_name = shards[k], shards[(k + 1) % len(shards)]
                shard_dir = os.path.join(url, schema.SHARDS_DIR)
                if backend == "zarr":  # any file a trainer reads: a chunk, an array's or the group's zarr.json
                    files = schema.read_metadata(url).shards[k].checksums
                    donor_files = schema.read_metadata(url).shards[(k + 1) % len(shards)].checksums
                    rel = rng.choice(
                        sorted(
                            f
                            for f in files
                            if not f.startswith("logvar/")  # (not read here)
                            # a replacement must differ (arrays' zarr.json are alike across shards)
                            and (kind != "replace" or files[f] != donor_files.get(f))
                        )
                    )
                    target, donor = os.path.join(shard_dir, name, rel), os.path.join(shard_dir, donor_name, rel)
                else:
                    rel, target, donor = "", os.path.join(shard_dir, name), os.path.join(shard_dir, donor_name)
                _rot(target, kind, donor, rng)
                resident = trial % 2 == 0
                ok = _refused(name, _read_store, url, resident)
                survived += ok
                notes.append(
                    f"{name}/{rel} ({'resident' if resident else 'streaming'}): {'refused' if ok else 'MISSED'}"
                )
            details[f"{backend}-{kind}"] = notes
            rows.append(
                row(
                    "bit rot",
                    f"{backend} latent shard {kind} -> LatentDataset",
                    TRIALS,
                    TRIALS,
                    survived,
                    f"{survived}/{TRIALS} refused, naming the shard",
                    time.monotonic() - t0,
                )
            )
    return rows, details


def _cold_load(url: str) -> float:
    t = time.perf_counter()
    _read_store(url, resident=True)
    return time.perf_counter() - t


def verification_overhead(root: Path, backend: str) -> dict[str, Any]:
    """Median cold load (a fresh LatentDataset reads every shard once, as a training process's first epoch does) of
    an SD-like store, with the checks and with them switched off, alternating."""
    url = str(root / f"overhead-{backend}")
    build_random_store(url, {**SD, "rows": OVERHEAD_ROWS}, backend)
    size = sum(s.bytes for s in LatentStore(url).shards)
    _cold_load(url)  # warm the page cache for both
    checked, unchecked = [], []
    for _ in range(OVERHEAD_REPS):
        checked.append(_cold_load(url))
        with mock.patch.object(LatentStore, "_to_verify", lambda self, k, fields: None):
            unchecked.append(_cold_load(url))
    c, u = statistics.median(checked), statistics.median(unchecked)
    shutil.rmtree(url)
    return {
        "backend": backend,
        "rows": OVERHEAD_ROWS,
        "store_mb": size / 2**20,
        "checked_s": c,
        "unchecked_s": u,
        "overhead_pct": 100 * (c - u) / u,
        "checked_all_s": checked,
        "unchecked_all_s": unchecked,
    }


def bitrot(root: Path, rng: random.Random, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    dataset, stores, models = _build(root / "clean")
    clean_ok = True
    try:
        _read_dataset(dataset)
        for url in stores.values():
            _read_store(url, resident=True)
            _read_store(url, resident=False)
    except CorruptShardError:
        clean_ok = False
    rows = [
        row(
            "bit rot",
            "clean dataset and stores read whole",
            1,
            0,
            0,
            "read whole" if clean_ok else "A CLEAN STORE WAS REFUSED",
            time.monotonic() - t0,
        )
    ]
    if not clean_ok:
        rows[0]["faults"] = 1  # counts as a failure in the totals
    log("  dataset shards")
    dataset_rows, dataset_details = _dataset_rows(root, dataset, models, rng)
    log("  latent shards")
    store_rows, store_details = _store_rows(root, stores, rng)
    log("  overhead")
    t = time.monotonic()
    overhead = [verification_overhead(root, backend) for backend in ("zarr", "parquet")]
    note = "; ".join(
        f"{o['backend']} {o['store_mb']:.0f} MB: {o['unchecked_s']:.2f} s -> {o['checked_s']:.2f} s "
        f"({o['overhead_pct']:+.0f}%)"
        for o in overhead
    )
    rows.append(
        row(
            "bit rot",
            "cost: first load of an SD-like store, checked vs unchecked",
            OVERHEAD_REPS,
            0,
            0,
            note,
            time.monotonic() - t,
            "once per shard per process; later epochs read no more",
        )
    )
    return rows + dataset_rows + store_rows, {"dataset": dataset_details, "stores": store_details, "overhead": overhead}
