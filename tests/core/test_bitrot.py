"""Bit rot is seen (issue 22): a dataset shard or a latent store shard (Zarr or Parquet, local or s3://) that changed
on storage after it was written — a flipped byte, a truncation, a replaced or missing file — is refused when it is
read, with one line naming the shard and its URL; a clean store reads as before; older manifests and stores (no
checksums) are read unchecked and counted."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from ldm_core import storage
from ldm_core.data import ImageShardDataset, IngestConfig, canonical, ingest, write_shapes_source
from ldm_core.data.integrity import CorruptShardError
from ldm_core.data.latent_dataset import LatentDataset
from ldm_core.data.latent_store import schema
from ldm_core.data.latent_store.encoding import encode_dataset
from ldm_core.data.latent_store.schema import LatentStoreConfig
from ldm_core.models.autoencoder import AutoencoderKL, autoencoder_preset
from ldm_core.text_encoder import TextEncoder, TextEncoderConfig

ROWS_PER_SHARD = 10
VICTIM = 1  # the dataset shard (and its latent shard) that rots; the others stay clean


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return AutoencoderKL(autoencoder_preset("tiny")).eval(), TextEncoder(TextEncoderConfig(max_length=8))


@pytest.fixture(scope="module")
def clean(tmp_path_factory, models):
    """A dataset of 4 shards and its latent stores in both formats, written once; tests rot copies of them."""
    root = tmp_path_factory.mktemp("bitrot")
    write_shapes_source(str(root / "src"), 40, seed=0)
    ingest(IngestConfig(source=str(root / "src"), rows_per_shard=ROWS_PER_SHARD, val_fraction=0.25), str(root / "ds"))
    vae, text = models
    for backend in ("zarr", "parquet"):
        encode_dataset(
            str(root / "ds"),
            str(root / backend),
            vae,
            text,
            LatentStoreConfig(resolution=32, batch_size=8, backend=backend),
            vae_identity="vae/1",
            split=None,
        )
    return root


def _copy(clean, tmp_path, what: str) -> str:
    shutil.copytree(clean / what, tmp_path / what)
    return str(tmp_path / what)


def _flip(path: str, offset: int | None = None) -> None:
    data = bytearray(open(path, "rb").read())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01  # one bit
    open(path, "wb").write(bytes(data))


def _truncate(path: str) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 7])


def _read_every_image(url: str) -> int:
    ds = ImageShardDataset(url, split=None)
    return sum(1 for i in range(len(ds)) if ds[i].shape == (3, 32, 32))


# ----------------------------------------------------------------------------------------------------------------
# the canonical dataset
# ----------------------------------------------------------------------------------------------------------------


def test_a_clean_dataset_reads_whole_and_records_a_sha256_per_shard(clean, tmp_path):
    url = _copy(clean, tmp_path, "ds")
    manifest = canonical.read_manifest(url)
    assert all(s.sha256 and len(s.sha256) == 64 for s in manifest.shards)
    assert _read_every_image(url) == 40
    assert ImageShardDataset(url, split=None).unchecked_shards == 0


@pytest.mark.parametrize("rot", ["flip", "truncate", "replace"])
def test_a_rotten_dataset_shard_is_refused_by_the_dataset_and_the_encoder(clean, tmp_path, models, rot):
    url = _copy(clean, tmp_path, "ds")
    name = canonical.shard_name(VICTIM)
    path = os.path.join(url, name)
    if rot == "flip":
        _flip(path)  # in the image bytes: pyarrow would read it without a word
    elif rot == "truncate":
        _truncate(path)
    else:  # another shard's file, a valid Parquet file with the same schema
        shutil.copyfile(os.path.join(url, canonical.shard_name(VICTIM + 1)), path)
    with pytest.raises(CorruptShardError) as err:
        _read_every_image(url)
    message = str(err.value)
    assert f"corrupt dataset shard {name} at {url}" in message and "\n" not in message
    vae, text = models
    with pytest.raises(CorruptShardError, match=f"shard {name} at"):
        encode_dataset(
            url,
            str(tmp_path / "store"),
            vae,
            text,
            LatentStoreConfig(resolution=32, batch_size=8),
            vae_identity="vae/1",
            split=None,
        )
    # nothing of the rotten shard reached the store: the encoder stopped at it
    store = schema.read_metadata(str(tmp_path / "store"))
    assert name not in {s.source for s in store.shards}


def test_a_manifest_written_before_sha256s_is_read_unchecked_and_counted(clean, tmp_path):
    url = _copy(clean, tmp_path, "ds")
    raw = json.loads(open(os.path.join(url, canonical.MANIFEST_NAME)).read())
    for shard in raw["shards"]:
        del shard["sha256"]
    open(os.path.join(url, canonical.MANIFEST_NAME), "w").write(json.dumps(raw))
    ds = ImageShardDataset(url, split=None)
    assert ds.unchecked_shards == 4 and _read_every_image(url) == 40


# ----------------------------------------------------------------------------------------------------------------
# the latent store
# ----------------------------------------------------------------------------------------------------------------


def _victim(store_url: str) -> tuple[str, str]:
    """(name, local path) of the store shard that encodes the VICTIM dataset shard."""
    record = schema.read_metadata(store_url).shard_by_source()[canonical.shard_name(VICTIM)]
    return record.name, os.path.join(store_url, schema.SHARDS_DIR, record.name)


def _read_everything(store_url: str, resident: bool) -> None:
    ds = LatentDataset(store_url, split=None, max_cache_bytes=2**40 if resident else 1, prefetch=2)
    try:
        assert ds.resident is resident
        ds.get_batch(list(range(len(ds))))
        ds.rows(list(range(len(ds))))
    finally:
        ds.close()


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_a_clean_store_reads_whole_in_both_modes(clean, tmp_path, backend):
    url = _copy(clean, tmp_path, backend)
    assert all(s.checksums for s in schema.read_metadata(url).shards)
    for resident in (True, False):
        _read_everything(url, resident)


ROTS = {
    # Zarr: a bit of a latents chunk; a chunk replaced by the same chunk of another shard (valid data: Zarr reads
    # it without a word); a truncated chunk; a deleted chunk (Zarr would fill it with zeros)
    "zarr": ["flip", "replace", "truncate", "missing"],
    # Parquet: a bit of the file; the file replaced by another shard's (a valid file of the same schema); truncated
    "parquet": ["flip", "replace", "truncate"],
}


@pytest.mark.parametrize("backend,rot", [(b, r) for b, rots in ROTS.items() for r in rots])
@pytest.mark.parametrize("resident", [True, False], ids=["resident", "streaming"])
def test_a_rotten_latent_shard_is_refused_naming_it(clean, tmp_path, backend, rot, resident):
    url = _copy(clean, tmp_path, backend)
    name, path = _victim(url)
    if backend == "zarr":
        target = os.path.join(path, "latents", "c", "0", "0", "0", "0")
        donor_name = next(s.name for s in schema.read_metadata(url).shards if s.name != name)
        donor = os.path.join(url, schema.SHARDS_DIR, donor_name, "latents", "c", "0", "0", "0", "0")
    else:
        target = path
        donor = next(
            os.path.join(url, schema.SHARDS_DIR, s.name) for s in schema.read_metadata(url).shards if s.name != name
        )
    if rot == "flip":
        _flip(target)
    elif rot == "replace":
        shutil.copyfile(donor, target)
    elif rot == "truncate":
        _truncate(target)
    else:
        os.remove(target)
    with pytest.raises(CorruptShardError) as err:
        _read_everything(url, resident)
    message = str(err.value)
    assert f"corrupt latent store shard {name} at {os.path.join(url, schema.SHARDS_DIR, name)}" in message
    assert "\n" not in message


def test_a_rotten_latent_shard_on_s3_is_refused_naming_it(clean, s3_url):
    local = str(clean / "zarr")
    for root, _, files in os.walk(local):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), local).replace(os.sep, "/")
            storage.write_bytes_atomic(f"{s3_url}/{rel}", open(os.path.join(root, f), "rb").read())
    _read_everything(s3_url, resident=True)  # the clean copy reads
    name, _ = _victim(local)
    chunk = f"{s3_url}/{schema.SHARDS_DIR}/{name}/latents/c/0/0/0/0"
    data = bytearray(storage.read_bytes(chunk))
    data[len(data) // 2] ^= 0x01
    storage.write_bytes_atomic(chunk, bytes(data))
    with pytest.raises(CorruptShardError, match=f"corrupt latent store shard {name} at {s3_url}/shards/{name}"):
        _read_everything(s3_url, resident=False)
