"""Writer leases (`ldm_core.leases`) and what they guard: one live writer per directory, a second one waits and is
then refused by name; a holder paused past its lease (a zombie) is taken over and can then neither commit, nor
prune a checkpoint, nor delete a shard the live writer has not recorded yet."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from ldm_core import storage
from ldm_core.checkpoint import CheckpointManager
from ldm_core.data.latent_store import LatentStoreConfig, LatentStoreMetadata, read_metadata
from ldm_core.data.latent_store import writer as store_writer
from ldm_core.data.latent_store.backends import ShardColumns
from ldm_core.data.latent_store.writer import LatentStoreWriter
from ldm_core.leases import LeaseHeldError, LeaseLostError, WriterLease


def _later(hours: float = 1.0):
    """A clock that reads ``hours`` ahead: its owner sees every lease as long expired, as after a pause that long."""
    return lambda: time.time() + 3600 * hours


def test_a_second_writer_waits_then_is_refused_naming_the_holder(tmp_path):
    with WriterLease(str(tmp_path), run_id="run-a", ttl=30):
        t0 = time.monotonic()
        with pytest.raises(LeaseHeldError, match=r"run run-a, pid \d+ on .*token 1.*lease expires at"):
            WriterLease(str(tmp_path), ttl=30, wait=0.5, poll=0.1).acquire()
        assert time.monotonic() - t0 >= 0.5, "it did not wait"


def test_a_waiting_writer_gets_the_lease_once_the_holder_releases_it(tmp_path):
    first = WriterLease(str(tmp_path), ttl=30).acquire()
    threading.Timer(0.3, first.release).start()
    with WriterLease(str(tmp_path), ttl=30, wait=10, poll=0.05) as second:
        second.assert_held()


def test_an_expired_holder_is_taken_over_and_then_fails_its_checks(tmp_path):
    zombie = WriterLease(str(tmp_path), ttl=30).acquire()
    live = WriterLease(str(tmp_path), ttl=30, clock=_later()).acquire()
    assert live.token == zombie.token + 1
    with pytest.raises(LeaseLostError, match="token 2"):
        zombie.assert_held()
    live.assert_held()
    zombie.release()  # a lost lease is left to its new holder
    live.assert_held()
    live.release()


def test_a_holder_late_to_renew_keeps_the_lease_nobody_took(tmp_path):
    now = [time.time()]
    lease = WriterLease(str(tmp_path), ttl=30, clock=lambda: now[0]).acquire()
    now[0] += 120  # its heartbeat was starved for longer than the ttl, but no other writer came
    lease.assert_held()  # renewed by compare-and-swap, not lost
    now[0] += 20
    lease.assert_held()
    lease.release()


def test_a_second_trainer_waits_for_the_checkpoint_directory_then_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_WRITER_LEASE_WAIT", "0.5")
    first = CheckpointManager(str(tmp_path))
    first.acquire(run_id="trainer-1")
    first.save(1, {"w": torch.ones(2)})
    with pytest.raises(LeaseHeldError, match="trainer-1"):
        CheckpointManager(str(tmp_path)).save(2, {"w": torch.zeros(2)})
    assert first.steps() == [1]
    first.release()
    CheckpointManager(str(tmp_path)).save(2, {"w": torch.zeros(2)})  # free again


def test_a_trainer_holds_its_checkpoint_directory_from_before_it_resumes(tmp_path, monkeypatch):
    """A second trainer on a directory in use is refused before it resumes or steps, naming the run that holds it."""
    from benchmarks.faults import runner
    from ldm_core.trainers.autoencoder import train_autoencoder

    monkeypatch.setenv("LDM_WRITER_LEASE_WAIT", "0.5")
    holder = CheckpointManager(str(tmp_path))
    holder.acquire(run_id="run-1")
    steps = []
    with pytest.raises(LeaseHeldError, match="run-1"):
        train_autoencoder(
            runner.ae_config(2),
            runner.ae_data(),
            checkpoint_dir=str(tmp_path),
            perceptual=None,
            should_stop=lambda s: steps.append(s) or False,
        )
    assert steps == [], "the second trainer trained"
    holder.release()
    done = train_autoencoder(runner.ae_config(2), runner.ae_data(), checkpoint_dir=str(tmp_path), perceptual=None)
    assert done.step == 2 and CheckpointManager(str(tmp_path)).steps()[-1] == 2
    assert not storage.exists(storage.join(str(tmp_path), "_writer_lease.json")), "the trainer kept its lease"


def test_a_zombie_trainer_cannot_save_over_or_prune_the_live_ones_checkpoints(tmp_path):
    zombie = CheckpointManager(str(tmp_path), keep=2)
    zombie.acquire()
    for step in (1, 2):
        zombie.save(step, {"step": torch.tensor(step), "by": "zombie"})
    # the zombie is paused past its lease; a second trainer takes the directory over and saves steps 3 and 4
    live = CheckpointManager(str(tmp_path), keep=2)
    live.acquire(lease=WriterLease(str(tmp_path), clock=_later()))
    for step in (3, 4):
        live.save(step, {"step": torch.tensor(step), "by": "live"})
    assert live.steps() == [3, 4]
    # the zombie resumes at its next save: refused before it writes or prunes anything
    with pytest.raises(LeaseLostError):
        zombie.save(5, {"step": torch.tensor(5), "by": "zombie"})
    with pytest.raises(LeaseLostError):
        zombie.save(4, {"step": torch.tensor(4), "by": "zombie"})
    assert live.steps() == [3, 4]
    for step in (3, 4):
        assert live.load(step)["by"] == "live"
    live.save(5, {"step": torch.tensor(5), "by": "live"})
    assert live.steps() == [4, 5]
    live.release()


# ---------------------------------------------------------------------------------------------------------------
# The latent store: a zombie's orphan cleanup inside the live writer's commit window
# ---------------------------------------------------------------------------------------------------------------

L, D, LATENT = 4, 8, (4, 2, 2)


def _template() -> LatentStoreMetadata:
    return LatentStoreMetadata(
        backend="parquet",
        dtype="fp32",
        content="moments",
        resolution=16,
        seed=0,
        vae_identity="test:vae",
        scaling_factor=1.0,
        shift_factor=0.0,
        text_encoder_identity="test:text",
        latent_shape=list(LATENT),
        context_shape=[L, D],
        pooled_dim=D,
    )


def _columns(n: int) -> ShardColumns:
    rng = np.random.default_rng(n)
    rows = pa.table({"id": [f"{i:016x}" for i in range(n)], "caption": ["c"] * n, "split": ["train"] * n})
    return ShardColumns(
        rng.standard_normal((n, *LATENT), dtype=np.float32),
        rng.standard_normal((n, *LATENT), dtype=np.float32),
        rng.standard_normal((n, L, D), dtype=np.float32),
        np.ones((n, L), bool),
        rows,
        rng.standard_normal((n, D), dtype=np.float32),
    )


def _open(url: str, lease: WriterLease | None = None) -> LatentStoreWriter:
    return LatentStoreWriter.open(
        url,
        _template(),
        LatentStoreConfig(backend="parquet", dtype="fp32"),
        (torch.zeros(1, L, D), torch.ones(1, L, dtype=torch.bool), torch.zeros(1, D)),
        lease=lease,
    )


def test_a_zombie_store_writer_never_deletes_a_shard_the_live_one_is_about_to_record(tmp_path, monkeypatch):
    url = str(tmp_path / "store")
    zombie = _open(url)
    zombie.write_shard("shard-00000.parquet", _columns(3), source_rows=3)
    # the zombie is paused past its lease; a second writer takes the store over
    live = _open(url, WriterLease(url, clock=_later()))
    assert live.metadata.writer_generation == zombie.metadata.writer_generation + 1

    # the zombie wakes up inside the live writer's commit window (its shard written, not yet recorded) and runs
    # its orphan cleanup, then tries to commit
    woke = {}

    def zombie_wakes_up() -> None:
        if woke:  # (the zombie's own commit window)
            return
        woke["removed"] = zombie.remove_orphans()
        with pytest.raises(LeaseLostError):
            zombie.write_shard("shard-00002.parquet", _columns(2), source_rows=2)

    monkeypatch.setattr(store_writer, "pause_before_commit", zombie_wakes_up)
    live.write_shard("shard-00001.parquet", _columns(4), source_rows=4)
    monkeypatch.undo()
    live.close()
    assert "removed" in woke
    meta = read_metadata(url)
    assert [s.source for s in meta.shards] == ["shard-00000.parquet", "shard-00001.parquet"] and meta.rows == 7
    for s in meta.shards:
        assert storage.exists(storage.join(url, "shards", s.name)), f"the store names a missing shard {s.name}"
