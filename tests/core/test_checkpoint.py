import hashlib
import logging

import pytest
import torch

from ldm_core.checkpoint import CheckpointManager, state_from_bytes, state_to_bytes


def _state(seed):
    torch.manual_seed(seed)
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(m.parameters(), betas=(0.5, 0.9))
    m(torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()
    return {
        "model": m.state_dict(),
        "opt": opt.state_dict(),
        "rng": torch.get_rng_state(),
        "pos": (2, 7),
        "meta": {"name": "x", "vals": [1.5, None, True]},
    }


def test_nested_state_round_trip_is_exact():
    s = _state(0)
    r = state_from_bytes(state_to_bytes(s))
    assert r["pos"] == (2, 7) and r["meta"] == s["meta"]
    for k, v in s["model"].items():
        assert torch.equal(r["model"][k], v)
    assert torch.equal(r["rng"], s["rng"])
    # optimizer state keys are ints and betas a tuple: both survive, so load_state_dict accepts it
    assert set(r["opt"]["state"]) == {0, 1}
    assert r["opt"]["param_groups"][0]["betas"] == (0.5, 0.9)
    m = torch.nn.Linear(4, 3)
    torch.optim.Adam(m.parameters()).load_state_dict(r["opt"])


def test_manager_keeps_latest_and_prunes(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep=2)
    for step in (10, 20, 30):
        mgr.save(step, {"step": step})
    assert mgr.steps() == [20, 30]
    step, state = mgr.load_latest()
    assert (step, state["step"]) == (30, 30)


def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog):
    mgr = CheckpointManager(str(tmp_path), keep=3)
    mgr.save(1, _state(1))
    mgr.save(2, _state(2))
    body = tmp_path / "step-000000002.safetensors"
    data = bytearray(body.read_bytes())
    data[-5] ^= 0xFF  # flip a bit inside a tensor
    body.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        step, state = mgr.load_latest()
    assert step == 1
    assert "checksum mismatch" in caplog.text


def test_truncated_and_unrecorded_checkpoints_are_skipped(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep=5)
    mgr.save(1, {"a": torch.ones(3)})
    mgr.save(2, {"a": torch.ones(3) * 2})
    # a body whose write never got its commit record (killed in between)
    (tmp_path / "step-000000003.safetensors").write_bytes(b"partial")
    # a truncated body with a stale record
    body2 = tmp_path / "step-000000002.safetensors"
    body2.write_bytes(body2.read_bytes()[:20])
    step, state = mgr.load_latest()
    assert step == 1 and torch.equal(state["a"], torch.ones(3))


def test_sidecar_is_sha256_of_body(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(5, {"a": torch.arange(4)})
    body = (tmp_path / "step-000000005.safetensors").read_bytes()
    assert (tmp_path / "step-000000005.sha256").read_text() == hashlib.sha256(body).hexdigest()


def test_unsupported_values_are_rejected():
    with pytest.raises(TypeError, match="object"):
        state_to_bytes({"x": object()})
