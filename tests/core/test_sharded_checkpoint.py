"""Sharded (DCP) checkpoints on local disk and on S3 (moto on loopback): exact round trip, pruning, the commit
record as the atomic commit, and a corrupt or incomplete newest step skipped for the previous one. One process here
(the multi-process save, load and resharding are in test_fsdp_training.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from ldm_core import storage
from ldm_core.sharded_checkpoint import ShardedCheckpointManager, split_state


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "step": step,
        "position": {"epoch": 0, "batch": step},
        "config": {"denoiser": {"width": 8}},
        "model": {"w": torch.randn(4, 8, generator=g), "b": torch.randn(8, generator=g)},
        "opt": {"state": {"w": {"exp_avg": torch.randn(4, 8, generator=g), "step": torch.tensor(float(step))}}},
        "rng": {"torch": torch.get_rng_state(), "python": [1, 2, 3]},
    }


def _template() -> dict:
    """What a run holds before it resumes: the same structure, other values."""
    state = _state(999)
    state["step"], state["position"] = 0, {"epoch": 0, "batch": 0}
    return state


def _assert_equal(a: dict, b: dict) -> None:
    ta, sa = split_state(a)
    tb, sb = split_state(b)
    assert sa == sb and ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _files(manager: ShardedCheckpointManager, step: int) -> list[str]:
    url = storage.join(manager.directory, f"step-{step:09d}.dcp")
    return [storage.join(url, n) for n in storage.list_dir(url) if n.endswith(".distcp")]


def test_round_trip_is_exact_and_old_steps_are_pruned(storage_root):
    manager = ShardedCheckpointManager(storage.join(storage_root, "ckpt"), keep=2)
    manager.acquire()
    try:
        for step in (1, 2, 3):
            manager.save(step, _state(step))
    finally:
        manager.release()
    assert manager.steps() == [2, 3]
    assert sorted(storage.list_dir(manager.directory)) == [
        "step-000000002.dcp",
        "step-000000002.dcp.json",
        "step-000000003.dcp",
        "step-000000003.dcp.json",
    ]
    template = _template()
    step, state = manager.load_latest(template)
    assert step == 3
    _assert_equal(state, _state(3))
    assert state["model"]["w"] is not None and template["model"]["w"].equal(_state(3)["model"]["w"])  # in place


def test_a_corrupt_newest_step_is_skipped_for_the_previous_one(storage_root, caplog):
    manager = ShardedCheckpointManager(storage.join(storage_root, "ckpt"), keep=3)
    for step in (1, 2):
        manager.save(step, _state(step))
    (shard,) = _files(manager, 2)
    data = bytearray(storage.read_bytes(shard))
    data[len(data) // 2] ^= 0xFF  # one flipped bit-pattern in the middle of the tensor data
    storage.remove(shard)
    storage.write_bytes_atomic(shard, bytes(data))
    with caplog.at_level(logging.WARNING, logger="ldm_core.sharded_checkpoint"):
        step, state = manager.load_latest(_template())
    assert step == 1
    _assert_equal(state, _state(1))
    assert any("step-000000002.dcp" in r.getMessage() and "checksum mismatch" in r.getMessage() for r in caplog.records)


def test_a_step_without_its_commit_record_is_ignored_and_removed_by_the_next_holder(tmp_path):
    manager = ShardedCheckpointManager(str(tmp_path / "ckpt"))
    manager.save(1, _state(1))
    manager.save(2, _state(2))
    # a save killed between the shards and the record: the files are whole, the record never landed
    storage.remove(storage.join(manager.directory, "step-000000002.dcp.json"))
    assert manager.steps() == [1]
    step, _ = manager.load_latest(_template())
    assert step == 1
    manager.acquire()
    manager.release()
    assert "step-000000002.dcp" not in storage.list_dir(manager.directory)


def test_a_record_whose_shard_is_missing_is_skipped(tmp_path, caplog):
    manager = ShardedCheckpointManager(str(tmp_path / "ckpt"))
    manager.save(1, _state(1))
    manager.save(2, _state(2))
    for shard in _files(manager, 2):
        storage.remove(shard)
    with caplog.at_level(logging.WARNING, logger="ldm_core.sharded_checkpoint"):
        step, _ = manager.load_latest(_template())
    assert step == 1
    assert any("is missing" in r.getMessage() for r in caplog.records)


def test_a_checkpoint_of_another_config_is_refused_before_its_tensors_are_read(tmp_path, monkeypatch):
    manager = ShardedCheckpointManager(str(tmp_path / "ckpt"))
    manager.save(1, _state(1))

    def refuse(state):
        assert state["model"]["w"] is None  # the skeleton only: no tensor read yet
        raise ValueError("a different denoiser config")

    monkeypatch.setattr("torch.distributed.checkpoint.load", lambda *a, **k: pytest.fail("tensors were read"))
    with pytest.raises(ValueError, match="different denoiser"):
        manager.load_latest(_template(), check=refuse)


def test_a_template_with_tensors_the_checkpoint_lacks_is_refused(tmp_path):
    manager = ShardedCheckpointManager(str(tmp_path / "ckpt"))
    manager.save(1, _state(1))
    template = _template()
    template["model"]["extra"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match="lacks 1 tensors"):
        manager.load_latest(template)
