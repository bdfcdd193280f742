"""A stop signal (SIGTERM, SIGINT) turned into a checkpoint at the next step boundary instead of lost work.

Kubernetes preempts a pod with SIGTERM and kills it a grace period later; a cancelled Dagster run reaches its step
processes as SIGINT. Either way the process should stop where it can resume: ``stop_on_signals()`` replaces the
handlers of those signals for the duration of a training run by one that only records the signal, and its
``StopRequest`` is the trainers' ``should_stop``. The loop (`ldm_core.trainers.loop`) asks it after every step,
under torchrun as a collective (any rank's request stops every rank at the same step), writes a checkpoint and
returns; the caller then raises `TrainingInterrupted`, an ordinary exception, so a retry policy retries the work and
the retry resumes from that checkpoint. The latency from the signal to the committed checkpoint is at most one step
plus one checkpoint write (plus start-up, when the signal comes before the first step): the grace period a
deployment gives must exceed it.

The previous handlers come back when the block ends. Inside a Dagster step those are Dagster's own, which turn
SIGINT and SIGTERM into an interrupt raised wherever the step's code happens to be (mid-step, mid-write); inside the
block a signal waits for the step boundary instead. Handlers can only be installed from the main thread; elsewhere
the block records nothing (a warning says so) and the process keeps whatever handling it has.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class StopRequest:
    """Whether a stop signal came, which, and when; callable as a trainer's ``should_stop(step)``."""

    signum: int | None = None
    received_at: float | None = None
    """``time.monotonic()`` at the first signal."""

    def __call__(self, step: int) -> bool:
        return self.signum is not None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def seconds_since(self) -> float:
        """Seconds since the first signal (0 without one)."""
        return time.monotonic() - self.received_at if self.received_at is not None else 0.0

    def record(self, signum: int, _frame: object = None) -> None:
        if self.signum is None:  # the first signal counts; a second one (an impatient operator) changes nothing
            self.signum, self.received_at = signum, time.monotonic()


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after its checkpoint at ``step`` was committed: run it again to resume there.

    An ``Exception`` on purpose: a Dagster asset that lets it through is retried by its RetryPolicy."""

    def __init__(self, what: str, step: int, signame: str, seconds: float):
        self.what, self.step, self.signame, self.seconds = what, step, signame, seconds
        super().__init__(
            f"{what} training stopped on {signame} at step {step}, {seconds:.1f}s after the signal, with "
            "that step's checkpoint committed; running it again resumes from there"
        )


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Record ``signals`` in the yielded `StopRequest` instead of acting on them; restore the previous handlers at
    the end of the block."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        log.warning("training outside the main thread: a stop signal cannot be turned into a checkpoint here")
        yield request
        return
    previous = {s: signal.signal(s, request.record) for s in signals}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class _Trained(Protocol):
    step: int


R = TypeVar("R", bound=_Trained)


def train_stoppable(what: str, train: Callable[[StopRequest], R]) -> R:
    """``train(should_stop)`` with the stop signals recorded; `TrainingInterrupted` once it returns if one came (its
    checkpoint is committed by then), else its result."""
    with stop_on_signals() as stop:
        result = train(stop)
    if stop.requested:
        err = TrainingInterrupted(what, result.step, stop.name, stop.seconds_since())
        log.warning("%s", err)
        raise err
    return result
