"""Storage faults against the real S3 endpoint (moto) through a fault-injecting proxy: transient errors (500, 503,
connection resets before and after the request took effect, slow responses) are retried and the work completes
with the same result as without faults; a permanent error fails with a message naming the URL and leaves what was
written before intact."""

import os

import pytest
import torch

from benchmarks.faults import campaign, runner
from benchmarks.faults.s3proxy import FAULTS, FaultPolicy, FaultProxy
from ldm_core import storage
from ldm_core.checkpoint import CheckpointManager
from ldm_core.data import IngestConfig, ingest, write_shapes_source
from ldm_core.data.latent_store.encoding import encode_dataset
from ldm_core.data.latent_store.schema import LatentStoreConfig


@pytest.fixture
def proxy(s3_endpoint, monkeypatch):
    """Every S3 request of this test goes through a fault proxy (no faults until a test sets a policy)."""
    with FaultProxy(s3_endpoint.endpoint_url) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    write_shapes_source(str(root / "src"), 24, seed=0)
    return str(root / "src")


def _ingest(source: str, url: str):
    return ingest(IngestConfig(source=source, rows_per_shard=8, val_fraction=0.25), url)


def test_ingestion_encoding_and_checkpoints_on_s3_survive_transient_faults(proxy, s3_url, source, tmp_path):
    from ldm_core.text_encoder import TextEncoder, TextEncoderConfig

    # fault-free local references
    ref_ds, ref_store = str(tmp_path / "ds"), str(tmp_path / "store")
    _ingest(source, ref_ds)
    vae, text = runner.encode_vae(), TextEncoder(TextEncoderConfig(max_length=8))
    cfg = LatentStoreConfig(resolution=32, batch_size=8, dtype="fp32")
    encode_dataset(ref_ds, ref_store, vae, text, cfg, vae_identity=runner.VAE_IDENTITY)

    # every 8th request fails, in turn: 500, 503, reset, lost (took effect, answer lost), slow
    proxy.set_policy(FaultPolicy(every=8, delay=0.3))
    ds, store, ckpt = f"{s3_url}/ds", f"{s3_url}/store", f"{s3_url}/ckpt"
    _ingest(source, ds)
    assert campaign.compare_dataset(ref_ds, ds) == (True, "24 rows equal")
    encode_dataset(ds, store, vae, text, cfg, vae_identity=runner.VAE_IDENTITY)
    equal, detail = campaign.compare_store(ref_store, store, expected_rows=24)
    assert equal, detail

    # a trainer checkpointing to s3, stopped and resumed under faults, ends equal to one that never saw S3
    from ldm_core.trainers.autoencoder import train_autoencoder

    def train(ckpt_dir, stop_at=None):
        return train_autoencoder(
            runner.ae_config(3),
            runner.ae_data(),
            checkpoint_dir=ckpt_dir,
            perceptual=None,
            should_stop=(lambda s: s == stop_at) if stop_at else None,
        )

    ref = train(str(tmp_path / "ckpt"))
    assert not train(ckpt, stop_at=2).finished
    resumed = train(ckpt)
    assert resumed.resumed_from == 2
    assert all(torch.equal(v, ref.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())
    assert CheckpointManager(ckpt).steps() == [2, 3]

    assert set(proxy.injected) == set(FAULTS) and sum(proxy.injected.values()) >= 10, (proxy.count, proxy.injected)


@pytest.mark.parametrize(
    "fault, error", [("403", PermissionError), ("nobucket", FileNotFoundError), ("reset", storage.StorageError)]
)
def test_a_permanent_error_names_the_url_and_leaves_earlier_writes_intact(
    proxy, s3_url, source, tmp_path, monkeypatch, fault, error
):
    monkeypatch.setenv("LDM_S3_MAX_ATTEMPTS", "2")  # a permanent fault fails in seconds, not minutes
    ds, ckpt = f"{s3_url}/ds", f"{s3_url}/ckpt"
    _ingest(source, ds)
    before = campaign.dataset_rows(ds)
    mgr = CheckpointManager(ckpt)
    mgr.save(1, {"w": torch.arange(4.0)})

    grown = tmp_path / "grown"
    write_shapes_source(str(grown), 32, seed=0)  # the same 24 images and 8 new ones
    proxy.set_policy(FaultPolicy(always=fault))
    with pytest.raises(error) as e:
        _ingest(str(grown), ds)
    assert ds in str(e.value), str(e.value)
    with pytest.raises(error) as e:
        mgr.save(2, {"w": torch.zeros(4)})
    assert ckpt in str(e.value), str(e.value)

    proxy.set_policy(FaultPolicy())  # the endpoint recovers: nothing written before was damaged
    assert campaign.dataset_rows(ds) == before
    step, state = mgr.load_latest()
    assert step == 1 and torch.equal(state["w"], torch.arange(4.0))
    result = _ingest(str(grown), ds)  # and the interrupted work completes
    assert result.rows_total == 32 and len(set(campaign.dataset_rows(ds))) == 32


def test_local_errors_keep_their_own_message():
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        storage.read_bytes(os.path.join("/nonexistent", "no-such-dir", "x"))
