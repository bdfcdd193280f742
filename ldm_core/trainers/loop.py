"""The loop both trainers run around their own step, so that they differ only in their model and their step.

resume from the newest checkpoint, if any, and stream batches from the position it recorded; then step by step:
1) the trainer's step (forward, backward, optimizer, EMA), which returns its metrics
2) every ``log_every`` steps and at the last: the interval's means to the tracker (means over the ranks)
3) every ``image_every`` steps: the trainer's images to the tracker (called on every rank, rank 0 logs)
4) every ``checkpoint_every`` steps, at the last, and when asked to stop: a checkpoint (rank 0, or every rank for a
   sharded one), never past the non-finite limit
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ldm_core import distributed
from ldm_core.tracking import Tracker
from ldm_core.trainers.config import TrainerConfig
from ldm_core.trainers.data_order import BatchStream
from ldm_core.trainers.meters import MetricWindow, ThroughputMeter
from ldm_core.trainers.run_setup import RunSetup
from ldm_core.trainers.run_state import RunState
from ldm_core.trainers.step import NonFiniteGuard


@dataclass
class StepOutput:
    """What one optimizer step reports."""

    logs: dict[str, torch.Tensor]
    """This step's metrics as device tensors (averaged over the logging interval with one host sync)."""
    flops: Sequence[str] = ("step",)
    """The kinds of pass the step ran, for the FLOPs and MFU report (`ThroughputMeter.metrics`)."""
    extra: dict[str, float] = field(default_factory=dict)
    """Host values logged beside the means when the interval ends (the learning rate)."""


class TrainingLoop:
    """One run's resumable state and its loop, built once the trainer holds every part a checkpoint saves.

    ``parts``: named objects with ``state_dict``/``load_state_dict`` (modules, optimizers, EMA, loss scales), restored
    from the newest checkpoint in ``checkpoint_dir`` when there is one; ``stream`` then yields this rank's batches
    from the recorded position, and ``guard`` counts the non-finite steps the trainer's step flags.
    """

    def __init__(
        self,
        tc: TrainerConfig,
        run: RunSetup,
        data: torch.utils.data.Dataset,
        parts: dict[str, Any],
        run_config: dict[str, Any],
        model_key: str | tuple[str, ...],
        what: str,
        checkpoint_dir: str | None,
        storage_options: dict[str, Any] | None,
        sharded_checkpoints: bool = False,
    ):
        self.tc, self.setup = tc, run
        sampler = run.sampler(len(data), tc.seed)
        self.checkpoints = run.checkpoints(tc, checkpoint_dir, storage_options, sharded=sharded_checkpoints)
        if self.checkpoints is not None:
            if run.rank == 0:  # the one rank that writes holds the directory for the whole run (`checkpoint`)
                self.checkpoints.acquire()
                # released when the run ends, or when the loop is dropped after an error (else the lease's
                # heartbeat would keep a dead run's directory locked for as long as this process lives)
                weakref.finalize(self, self.checkpoints.release)
            distributed.barrier()  # every rank reads the checkpoint the lease holder found, not an older one
        self.guard = NonFiniteGuard(tc.max_nonfinite_steps)
        self.state = RunState(run_config, model_key, parts, run.gen, self.guard)
        self.step, position, self.resumed_from = self.state.resume_latest(self.checkpoints, checkpoint_dir, what)
        self.stream = BatchStream(data, sampler, position, num_workers=tc.num_workers)
        self.window = MetricWindow()

    def run(
        self,
        train_step: Callable[[int], StepOutput],
        tracker: Tracker,
        meter: ThroughputMeter,
        *,
        rate_name: str = "samples_per_second",
        should_stop: Callable[[int], bool] | None = None,
        images: Callable[[int], None] | None = None,
        image_every: int = 0,
    ) -> bool:
        """Step until ``trainer.steps`` (``train_step`` takes the 0-based step); False when ``should_stop`` ended
        the run early, after a checkpoint (resume later). Every rank returns once rank 0's last checkpoint is
        committed."""
        try:
            return self._run(
                train_step,
                tracker,
                meter,
                rate_name=rate_name,
                should_stop=should_stop,
                images=images,
                image_every=image_every,
            )
        finally:
            if self.checkpoints is not None:
                self.checkpoints.release()

    def _run(
        self,
        train_step: Callable[[int], StepOutput],
        tracker: Tracker,
        meter: ThroughputMeter,
        *,
        rate_name: str,
        should_stop: Callable[[int], bool] | None,
        images: Callable[[int], None] | None,
        image_every: int,
    ) -> bool:
        tc, rank = self.tc, self.setup.rank
        finished = True
        while self.step < tc.steps:
            out = train_step(self.step)
            self.step += 1
            step = self.step
            meter.add(tc.batch_size)
            self.window.add(out.logs)
            if step % tc.log_every == 0 or step == tc.steps:  # every rank flushes (means over ranks); rank 0 logs
                means = self.window.flush(
                    step,
                    **out.extra,
                    nonfinite_skipped=float(self.guard.enforce(step)),
                    **meter.metrics(out.flops, name=rate_name),
                )
                if rank == 0:
                    tracker.log_metrics(means, step)
            if images is not None and image_every and step % image_every == 0:
                images(step)  # on every rank: a sharded model is gathered by all of them, rank 0 logs
            stop_now = should_stop is not None and distributed.any_rank(should_stop(step), self.setup.device)
            if step % tc.checkpoint_every == 0 or step == tc.steps or stop_now:
                self.state.save(self.checkpoints, step, self.stream.position, rank)
            if stop_now and step < tc.steps:
                finished = False
                break
        distributed.barrier()  # rank 0's last checkpoint is committed before any rank returns (and may resume from it)
        return finished
