"""Preemption keeps its work: SIGTERM to a training step commits a checkpoint at the next step within the grace
period, the step fails as retryable (Dagster retries it) and the retry resumes from that checkpoint; a step process
killed outright leaves no torchrun rank behind. The fault script (`python -m benchmarks.faults --only preemption`)
runs the same trials at random moments, more times."""

import os
import signal
import subprocess
import sys

import pytest

from benchmarks.faults import campaign, preemption
from ldm_core.trainers.preemption import StopRequest, TrainingInterrupted, stop_on_signals, train_stoppable
from pipeline.distributed import lifetime
from tests.common import python_env


def test_a_signal_is_recorded_only_inside_the_block_and_the_previous_handlers_come_back():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with stop_on_signals() as stop:
            signal.raise_signal(signal.SIGTERM)
            assert stop.requested and stop.name == "SIGTERM" and stop(7) and seen == []
        signal.raise_signal(signal.SIGTERM)  # the handler from before the block, again
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_stopped_training_raises_an_ordinary_exception_after_it_returns():
    """An ``Exception`` (not a BaseException): a Dagster RetryPolicy retries it."""

    class Result:
        step = 4

    def train(stop: StopRequest) -> Result:
        signal.raise_signal(signal.SIGINT)
        assert stop(3)  # the loop asks after each step; it checkpoints and returns
        return Result()

    with pytest.raises(TrainingInterrupted, match="SIGINT at step 4") as e:
        train_stoppable("test", train)
    assert isinstance(e.value, Exception) and e.value.step == 4
    assert train_stoppable("test", lambda stop: Result()).step == 4  # no signal, no error


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_process_whose_parent_died_before_it_asked_to_die_with_it_dies_at_once():
    """The race a parent-death signal leaves open: the parent dies between fork and prctl. The child, reparented,
    must notice (its parent is not the expected one) and end itself; with its real parent it lives on."""
    probe = (
        "import sys; from pipeline.distributed.lifetime import die_with_parent; "
        "die_with_parent(int(sys.argv[1])); print('alive')"
    )
    env = python_env()
    orphaned = subprocess.run([sys.executable, "-c", probe, "1"], env=env, capture_output=True, text=True)
    assert orphaned.returncode == -signal.SIGKILL and "alive" not in orphaned.stdout
    kept = subprocess.run([sys.executable, "-c", probe, str(os.getpid())], env=env, capture_output=True, text=True)
    assert kept.returncode == 0 and kept.stdout.strip() == "alive"
    # the wrapper that starts torchrun: the command it execs has the signal set, and learns its own pid
    status = subprocess.run(
        lifetime.tied_command(
            [
                sys.executable,
                "-c",
                (
                    "import ctypes, os; v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); "
                    f"print(v.value, os.environ['{lifetime.AGENT_PID_ENV}'] == str(os.getpid()))"
                ),
            ]
        ),
        env=env,
        capture_output=True,
        text=True,
    )
    assert status.stdout.split() == [str(int(signal.SIGKILL)), "True"], status.stderr


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_to_a_training_step_checkpoints_within_the_grace_and_the_retry_resumes_there(tmp_path, processes):
    """`dagster job execute` (in-process executor: the run process is the step process) gets SIGTERM mid-training
    of vae_model, on 1 process or on 2 under torchrun (the launcher forwards it, the agent hands it to the ranks)."""
    out = preemption.sigterm_trial(tmp_path, processes, after_step=3, delay_s=0.3, vae_steps=12)
    assert out["run_success"], out.get("log_tail")
    if processes == 2:
        assert out["ranks_at_signal"] == 2
    # a checkpoint the signal asked for: after every one committed before it, within the grace period
    assert out["stop_step"] is not None and out["stop_step"] > max(out["steps_before_signal"]), out
    assert out["latency_s"] <= preemption.GRACE_S, out
    # the step failed with TrainingInterrupted, which the asset's RetryPolicy retried ...
    assert out["retried"] == 1 and out["retried_on_training_interrupted"], out
    # ... and the retry resumed from that checkpoint, to the end
    assert out["resumed_from"] == out["stop_step"] > 0 and out["steps"] == 12
    if processes == 1:  # equal to an uninterrupted training, bit for bit
        assert out["weights_equal"]


@pytest.mark.slow
def test_sigkill_to_the_step_process_leaves_no_torchrun_rank_alive(tmp_path):
    out = preemption.orphan_trial(tmp_path)
    assert out["ranks"] == 2 and out["agents"] == 1, out
    assert out["alive_after"] == [], f"still running {out['seconds']}s after the step process died: {out}"


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """torchrun by hand, SIGTERM to rank 1 alone (the agent forwards to each rank in turn; they see it at different
    moments): the stop is agreed on by all ranks, so rank 0 commits the step they stopped at and all exit."""
    shared = campaign.prepare_inputs(tmp_path / "inputs", images=32)
    out = preemption.rank_sigterm_trial(tmp_path / "run", shared["dataset"])
    assert out["ranks"] == 2
    assert out["exited_within_grace"], out
    # rank 0 reported one stop, and its checkpoint is the newest (a periodic one may have come before it)
    assert len(out["stop_steps"]) == 1 and out["new_checkpoints"][-1:] == out["stop_steps"], out
    assert out["ranks_exit_interrupted"] == 2, out
