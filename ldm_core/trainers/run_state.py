"""What a checkpoint holds, and the resume that reverses it.

Exact resume rests on three things: every random draw comes from RNG state that is checkpointed; the data order is
a pure function of (seed, epoch) and the position inside the epoch is checkpointed (`ldm_core.trainers.data_order`);
and weights/optimizer state are saved bit-exact (safetensors). A run killed after step k and resumed then replays
steps k+1… exactly.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

from ldm_core import distributed
from ldm_core.checkpoint import CheckpointManager
from ldm_core.sharded_checkpoint import ShardedCheckpointManager
from ldm_core.trainers.data_order import DataPosition
from ldm_core.trainers.step import LossScaler, NonFiniteGuard

log = logging.getLogger(__name__)


def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


class RunState:
    """The resumable state of one training run, in one place for every trainer.

    ``parts`` are named objects with ``state_dict``/``load_state_dict`` (modules, optimizers, EMA); the RNG, the
    data position, the step and the non-finite counter come along. ``model_config`` is compared on resume so a
    checkpoint is never loaded into a different architecture.
    """

    def __init__(
        self,
        run_config: dict[str, Any],
        model_key: str | tuple[str, ...],
        parts: dict[str, Any],
        generator: torch.Generator,
        guard: NonFiniteGuard,
    ):
        self.run_config, self.model_keys = run_config, (model_key,) if isinstance(model_key, str) else model_key
        self.parts, self.generator, self.guard = parts, generator, guard

    def snapshot(self, step: int, position: DataPosition) -> dict[str, Any]:
        return {
            "step": step,
            "position": position.to_dict(),
            "config": self.run_config,
            **{name: part.state_dict() for name, part in self.parts.items()},
            "rng": capture_rng(self.generator),
            "nonfinite_skipped": self.guard.skipped,
            "world_size": distributed.current().world_size,
        }

    def check_config(self, state: dict[str, Any], where: str) -> None:
        """Refuses a checkpoint of another model (or adapter) config."""
        for key in self.model_keys:
            if state["config"].get(key) != self.run_config.get(key):
                raise ValueError(
                    f"the checkpoint in {where} was trained with a different {key} config; "
                    "point the checkpoint directory elsewhere to start a new run"
                )

    def restore(self, state: dict[str, Any], where: str) -> tuple[int, DataPosition]:
        self.check_config(state, where)
        for name, part in self.parts.items():
            if name not in state and isinstance(part, LossScaler):  # an fp16 checkpoint from before the scaler
                log.warning("the checkpoint in %s has no %s state: the fp16 loss scale starts afresh", where, name)
                continue
            part.load_state_dict(state[name])
        restore_rng(state["rng"], self.generator)
        self.guard.skipped = state["nonfinite_skipped"]
        saved_world, world = state.get("world_size", 1), distributed.current().world_size
        if saved_world != world:
            # the data position counts global micro-batches of micro_batch_size × world size: with the same
            # accumulation (e.g. micro_batch_size unset) the run continues exactly, otherwise only approximately
            log.warning(
                "resuming a checkpoint written by %d processes with %d: the continuation is exact only if "
                "the accumulation steps (batch_size / (micro_batch_size × processes)) are unchanged",
                saved_world,
                world,
            )
        return state["step"], DataPosition(**state["position"])

    def resume_latest(
        self, ckpt: CheckpointManager | ShardedCheckpointManager | None, where: str | None, what: str
    ) -> tuple[int, DataPosition, int | None]:
        """Loads the newest checkpoint in ``ckpt`` when there is one: (start step, data position, step resumed
        from or None for a fresh run)."""
        if ckpt is None:
            return 0, DataPosition(), None
        if isinstance(ckpt, ShardedCheckpointManager):  # loads into this run's shards, in place
            latest = ckpt.load_latest(
                self.snapshot(0, DataPosition()), check=lambda state: self.check_config(state, str(where))
            )
        else:
            latest = ckpt.load_latest()
        if latest is None:
            return 0, DataPosition(), None
        resumed_from, state = latest
        step, position = self.restore(state, str(where))
        log.info("resumed %s training from step %d (%s)", what, step, where)
        return step, position, resumed_from

    def save(
        self, ckpt: CheckpointManager | ShardedCheckpointManager | None, step: int, position: DataPosition, rank: int
    ) -> None:
        """Checkpoints (rank 0 alone, or every rank for sharded checkpoints), never past the non-finite limit: every
        rank raises alike before it."""
        self.guard.enforce(step)
        if ckpt is not None and (rank == 0 or isinstance(ckpt, ShardedCheckpointManager)):
            ckpt.save(step, self.snapshot(step, position))
