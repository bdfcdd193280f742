"""Atomic artifacts: a kill in the middle of any write leaves the previous version whole and readable; a partial
write is never taken for a whole one (checksums, commit records written last); what a kill leaves behind is cleaned
up by the next run; a corrupt newest checkpoint makes the trainer resume from the previous one, still bit for bit."""

import json
import logging
import os
import random
import subprocess
import sys
import time

import pytest
import torch

from benchmarks.faults import runner
from benchmarks.faults.campaign import ROOT
from benchmarks.faults.injectors import WRITE_LOOP, whole_version
from ldm_core import storage
from ldm_core.bundle import load_text_to_image, save_text_to_image
from ldm_core.checkpoint import CheckpointManager
from ldm_core.model_io import WEIGHTS, load_model, save_model
from ldm_core.models.autoencoder import AutoencoderConfig, build_autoencoder


def test_sigkill_during_atomic_writes_never_leaves_a_partial_artifact(tmp_path):
    target = tmp_path / "artifact.bin"
    rng = random.Random(0)
    versions = set()
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITE_LOOP, str(target), str(8 << 20)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        proc.stdout.readline()  # one version is committed
        time.sleep(rng.uniform(0.0, 0.3))  # then killed at a random moment, most likely inside a write
        proc.kill()
        proc.wait()
        proc.stdout.close()
        data = target.read_bytes()
        assert whole_version(data), "a reader saw a partial artifact"
        versions.add(int(data[:16]))
    assert len(versions) > 1, "the kills all landed at the same version: the loop did not run"
    # what the kills left (at most one temp file each) is removed by the directory's next writer
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != target.name]
    removed = storage.remove_stale_temp_files(str(tmp_path))
    assert removed == sorted(leftovers)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_checkpoint_save_cleans_what_a_killed_save_left(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep=2)
    partial = tmp_path / ".step-000000002.safetensors.k1ll3d.tmp"
    partial.write_bytes(b"\0" * 1000)  # a save killed mid-write
    mgr.save(1, {"w": torch.ones(3)})
    assert not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000001.safetensors", "step-000000001.sha256"]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, from the trainers' point of view
# ---------------------------------------------------------------------------------------------------------------


def _train_ae(ckpt_dir, steps=6, stop_at=None):
    return runner.train("ae", runner.ae_data(), ckpt_dir, steps, stop_at=stop_at)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _train_ae(tmp_path_factory.mktemp("full") / "ckpt")


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_commit_record"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_and_still_ends_bit_equal(
    tmp_path, uninterrupted, damage, caplog
):
    part = _train_ae(tmp_path, stop_at=4)
    assert not part.finished and CheckpointManager(str(tmp_path)).steps() == [3, 4]
    body = tmp_path / "step-000000004.safetensors"
    if damage == "truncate":  # a torn write that still got its record (e.g. a disk that lied about fsync)
        body.write_bytes(body.read_bytes()[: body.stat().st_size // 2])
    elif damage == "flip_byte":  # bit rot
        data = bytearray(body.read_bytes())
        data[len(data) // 2] ^= 0xFF
        body.write_bytes(bytes(data))
    else:  # killed between the body and its commit record
        (tmp_path / "step-000000004.sha256").unlink()
    with caplog.at_level(logging.WARNING, logger="ldm_core.checkpoint"):
        resumed = _train_ae(tmp_path)
    assert resumed.resumed_from == 3, "did not fall back to the previous good checkpoint"
    assert any("step-000000004" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
    assert resumed.step == 6 and runner.same_weights(resumed, uninterrupted)


def test_every_checkpoint_corrupt_starts_over_with_a_warning_per_file(tmp_path, uninterrupted, caplog):
    _train_ae(tmp_path, stop_at=4)
    for p in tmp_path.glob("*.safetensors"):
        p.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="ldm_core.checkpoint"):
        resumed = _train_ae(tmp_path)
    assert resumed.resumed_from is None
    assert sum("falling back" in r.getMessage() for r in caplog.records) == 2
    assert runner.same_weights(resumed, uninterrupted)  # a fresh start is still the same seeded run


# ---------------------------------------------------------------------------------------------------------------
# Saved models and bundles
# ---------------------------------------------------------------------------------------------------------------


def _ae(seed: int, **kw):
    torch.manual_seed(seed)
    return build_autoencoder(AutoencoderConfig.model_validate({"preset": "tiny", **kw}))


def _load_ae(url):
    return load_model(url, "autoencoder", lambda cfg: build_autoencoder(AutoencoderConfig.model_validate(cfg)))


class _Killed(BaseException):
    """Stands in for SIGKILL inside one process: nothing after the raise runs (not even `except Exception`)."""


def _kill_on_write(monkeypatch, name: str, nth: int = 1):
    """Make the ``nth`` atomic write of a file called ``name`` die before it lands."""
    real = storage.write_bytes_atomic
    seen = {"n": 0}

    def write(url, data, storage_options=None):
        if os.path.basename(str(url)) == name:
            seen["n"] += 1
            if seen["n"] == nth:
                raise _Killed(url)
        return real(url, data, storage_options)

    monkeypatch.setattr(storage, "write_bytes_atomic", write)


def test_a_model_save_killed_before_its_config_is_not_a_model(tmp_path, monkeypatch):
    url = str(tmp_path / "m")
    _kill_on_write(monkeypatch, "config.json")
    with pytest.raises(_Killed):
        save_model(url, _ae(0), "autoencoder", _ae(0).config)
    assert (tmp_path / "m" / WEIGHTS).exists()
    with pytest.raises(FileNotFoundError, match="no saved model"):
        _load_ae(url)


def test_a_model_overwrite_killed_midway_is_detected_not_mixed(tmp_path, monkeypatch):
    """Saving over an existing model (another architecture) and dying after the weights: loading refuses rather than
    pairing the new weights with the old config, or the old weights with the new config."""
    url = str(tmp_path / "m")
    save_model(url, _ae(0), "autoencoder", _ae(0).config)
    new = _ae(1, ch=32)
    _kill_on_write(monkeypatch, "config.json")
    with pytest.raises(_Killed):
        save_model(url, new, "autoencoder", new.config)
    monkeypatch.undo()
    with pytest.raises((FileNotFoundError, ValueError)):
        _load_ae(url)
    # and a whole overwrite loads the new model exactly
    save_model(url, new, "autoencoder", new.config)
    got = _load_ae(url)
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in got.state_dict().items())


def test_weights_that_do_not_match_their_recorded_checksum_are_refused(tmp_path):
    url = str(tmp_path / "m")
    save_model(url, _ae(0), "autoencoder", _ae(0).config)
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert len(meta["weights_sha256"]) == 64
    w = tmp_path / "m" / WEIGHTS
    data = bytearray(w.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in a weight: safetensors would load it without complaint
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        _load_ae(url)


def test_a_bundle_save_killed_before_bundle_json_is_not_a_bundle(tmp_path, monkeypatch):
    from ldm_core.diffusion import DiffusionConfig
    from ldm_core.models.denoiser import build_denoiser
    from ldm_core.models.unet import UNET_PRESETS
    from ldm_core.text_encoder import TextEncoderConfig

    torch.manual_seed(0)
    kw = dict(
        denoiser=build_denoiser(UNET_PRESETS["tiny"]),
        vae=_ae(0),
        diffusion_config=DiffusionConfig(kind="flow"),
        text_encoder_config=TextEncoderConfig(max_length=8),
        latent_shape=(4, 8, 8),
    )
    _kill_on_write(monkeypatch, "bundle.json")
    with pytest.raises(_Killed):
        save_text_to_image(str(tmp_path / "b"), **kw)
    with pytest.raises(FileNotFoundError, match="bundle.json"):
        load_text_to_image(str(tmp_path / "b"))
