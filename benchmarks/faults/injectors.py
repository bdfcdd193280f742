"""In-process fault injectors shared by the fault tests and the fault script."""

from __future__ import annotations

import hashlib

import torch

from ldm_core.checkpoint import CheckpointManager


class PoisonedAfter(torch.utils.data.Dataset):
    """The wrapped dataset, until ``good_batches`` batches were served; NaN ever after (a sensor gone bad)."""

    def __init__(self, data, good_batches: int):
        self.data, self.good, self.served = data, good_batches, 0

    def __len__(self) -> int:
        return len(self.data)

    def get_batch(self, indices):
        batch = self.data.get_batch(indices)
        self.served += 1
        if self.served > self.good:
            key = "latents" if isinstance(batch, dict) else None
            if key:
                batch = {**batch, key: torch.full_like(batch[key], float("nan"))}
            else:
                batch = torch.full_like(batch, float("nan"))
        return batch


class Preempted(RuntimeError):
    """What a step sees when its node goes away mid-training (here raised in the training process itself)."""


class FailOnceAfterCheckpoint:
    """Every trainer's checkpoints go through `CheckpointManager.save`: once step ``step`` is committed, the first
    time, the training fails with `Preempted`, as a step whose GPU node is reclaimed right after a checkpoint."""

    def __init__(self, step: int):
        self.step, self.fired = step, False

    def install(self, monkeypatch) -> FailOnceAfterCheckpoint:
        save = CheckpointManager.save

        def save_then_fail(manager: CheckpointManager, step: int, state):
            url = save(manager, step, state)
            if step == self.step and not self.fired:
                self.fired = True
                raise Preempted(f"preempted after the checkpoint of step {step}")
            return url

        monkeypatch.setattr(CheckpointManager, "save", save_then_fail)
        return self


# A process that rewrites one artifact (argv: path, size) forever; each version is "<i>" + sha256(body) + body.
WRITE_LOOP = r"""
import hashlib, sys
from ldm_core import storage
path, size = sys.argv[1], int(sys.argv[2])
i = 0
while True:
    body = hashlib.sha256(str(i).encode()).digest() * (size // 32)
    storage.write_bytes_atomic(path, str(i).encode().ljust(16) + hashlib.sha256(body).digest() + body)
    print(i, flush=True)
    i += 1
"""


def whole_version(data: bytes) -> bool:
    """Whether ``data`` is one complete version written by `WRITE_LOOP` (its checksum matches its body)."""
    return len(data) > 48 and hashlib.sha256(data[48:]).digest() == data[16:48]
