"""The one choice the GPU assets make: train in the asset's process, or on N processes under torchrun.

``train(context, compute, spec, tracker)`` runs ``spec.train(tracker)`` in-process when the compute resource asks for
one process; for more it writes the spec to a file and runs

    python -m torch.distributed.run --standalone --nproc-per-node N -m pipeline.distributed.train_<stage> spec.json

in a Dagster Pipes session (`run_torchrun`): rank 0's progress lines arrive in the run log as they happen, its metrics
in the asset's MLflow run, and its train result and metadata come back when it ends. Either way the asset gets the
same train result (the model loaded from the spec's ``output_url``) and carries on exactly as in-process.

Stopping (preemption, a cancelled run): a SIGTERM or SIGINT to the step process ends training at the next step with a
checkpoint, and the asset raises `TrainingInterrupted` (retried by its RetryPolicy; the retry resumes from the
checkpoint). In-process, the trainer itself turns the signal into that stop (`ldm_core.trainers.preemption`); under
torchrun the launcher forwards SIGTERM to torchrun's process group, the agent forwards it to the ranks and waits for
them, the ranks agree on the step, and the launcher waits up to ``compute.termination_grace_s`` before it kills
the group. torchrun and its ranks die with the step process whatever kills it (`pipeline.distributed.lifetime`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dagster as dg

from ldm_core import storage
from ldm_core.tracking import Tracker
from ldm_core.trainers.preemption import StopRequest, TrainingInterrupted, stop_on_signals
from pipeline.distributed import lifetime
from pipeline.distributed.entry import INTERRUPTED_MESSAGE, RESULT_MESSAGE
from pipeline.distributed.specs import LdmTrainSpec, VaeTrainSpec, result_from_summary
from pipeline.resources import ComputeResource


def torchrun_command(stage: str, processes: int, spec_path: str | Path, grace_s: int = 30) -> list[str]:
    """The torchrun command line for one node (``--standalone``: a local rendezvous on a free port); on a stop signal
    the agent gives its ranks ``grace_s`` to checkpoint and exit before it kills them."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        f"--shutdown-timeout={grace_s}",
        "-m",
        f"pipeline.distributed.train_{stage}",
        str(spec_path),
    ]


def _for_processes(spec: VaeTrainSpec | LdmTrainSpec) -> VaeTrainSpec | LdmTrainSpec:
    """Each rank picks its own GPU (LOCAL_RANK): a device pinned to one GPU index becomes plain "cuda"."""
    trainer = dict(spec.training.get("trainer") or {})
    if str(trainer.get("device", "auto")).startswith("cuda:"):
        trainer["device"] = "cuda"
    return spec.model_copy(update={"training": {**spec.training, "trainer": trainer}})


def train(
    context: dg.AssetExecutionContext,
    compute: ComputeResource,
    spec: VaeTrainSpec | LdmTrainSpec,
    tracker: Tracker,
    **in_process: Any,
) -> tuple[Any, dict[str, Any]]:
    """(train result, metadata for the asset) — in-process or under torchrun, as ``compute`` says.

    in_process: extra arguments of ``spec.train`` when it runs here (e.g. a dataset the asset already holds).
    """
    processes = compute.process_count()
    if processes == 1:
        return spec.train(tracker, **in_process), {"processes": 1, "launcher": "in-process"}
    return _train_under_torchrun(context, compute, _for_processes(spec), processes)


def _train_under_torchrun(
    context: dg.AssetExecutionContext, compute: ComputeResource, spec: VaeTrainSpec | LdmTrainSpec, processes: int
) -> tuple[Any, dict[str, Any]]:
    # CPU threads per rank: torchrun would set 1; share the cores out instead unless the resource says otherwise
    threads = compute.threads or max(1, (os.cpu_count() or 1) // processes)
    grace = compute.termination_grace_s
    with tempfile.TemporaryDirectory(prefix="ldm-spec-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec.to_json_file(spec_path)
        command = torchrun_command(spec.stage, processes, spec_path, grace)
        context.log.info(f"training {spec.stage} on {processes} processes: {' '.join(command)}")
        invocation, returncode, stop = run_torchrun(context, command, {"OMP_NUM_THREADS": str(threads)}, grace)
    messages = [m for m in invocation.get_custom_messages() if isinstance(m, dict)]
    if stopped := [m for m in messages if m.get("type") == INTERRUPTED_MESSAGE]:
        m = stopped[-1]
        raise TrainingInterrupted(spec.stage, m["step"], m["signal"], m["seconds"])  # retryable: resumes there
    if stop.requested:
        raise dg.Failure(
            f"torchrun was stopped by {stop.name} before rank 0 reported a checkpoint (it was starting, "
            f"or did not stop within {grace}s); a retry resumes from the last checkpoint"
        )
    if returncode != 0:
        # an ordinary failure, retried by the asset's RetryPolicy like a crash in-process (a lost device, a flaky store)
        raise dg.Failure(f"torchrun failed with exit status {returncode}; see the run's stdout/stderr")
    results = [m["result"] for m in messages if m.get("type") == RESULT_MESSAGE]
    if not results:
        raise dg.Failure(
            f"torchrun finished but rank 0 reported no train result for {spec.stage}; see the run's stdout/stderr"
        )
    reported = {k: getattr(v, "value", v) for k, v in invocation.get_materialize_result().metadata.items()}
    result = result_from_summary(spec, results[-1], spec.load_model())
    storage.remove(spec.output_url, recursive=True)  # a hand-over, not an artifact: the asset saves its own copy
    return result, {**reported, "processes": processes, "launcher": "torchrun"}


def run_torchrun(
    context: dg.AssetExecutionContext, command: list[str], env: dict[str, str], grace_s: float
) -> tuple[dg.PipesClientCompletedInvocation, int, StopRequest]:
    """Run ``command`` (torchrun) in a Pipes session, as ``dg.PipesSubprocessClient`` does, but tied to this process:
    in a session of its own and with a parent-death signal (`pipeline.distributed.lifetime`), its process group
    killed when it ends or this returns early. A SIGTERM or SIGINT here is forwarded to it as SIGTERM, and it gets
    ``grace_s`` from the signal to exit before its group is killed. (Dagster's own client forwards a SIGINT to the
    agent alone, waits 20 seconds, and leaves the ranks behind when this process is killed outright.)

    (the invocation, torchrun's exit status, the stop request that records any signal)."""
    with dg.open_pipes_session(
        context=context,
        context_injector=dg.PipesTempFileContextInjector(),
        message_reader=dg.PipesTempFileMessageReader(),
    ) as session:
        with stop_on_signals() as stop:
            proc = subprocess.Popen(
                lifetime.tied_command(command),
                start_new_session=True,
                env={**os.environ, **env, **session.get_bootstrap_env_vars()},
            )
            try:
                _wait_forwarding_stop(proc, stop, grace_s, context.log)
            finally:
                _end_group(proc)
    return dg.PipesClientCompletedInvocation(session), proc.returncode, stop


def _wait_forwarding_stop(proc: subprocess.Popen, stop: StopRequest, grace_s: float, log: Any) -> None:
    """Until ``proc`` exits (left unreaped, so its process group id stays its own): on a stop signal, SIGTERM to its
    group, and SIGKILL once ``grace_s`` has passed since the signal."""
    forwarded = killed = False
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
        if stop.requested and not forwarded:
            log.warning(f"{stop.name}: asking torchrun to checkpoint and stop (up to {grace_s:.0f}s)")
            _signal_group(proc, signal.SIGTERM)
            forwarded = True
        if forwarded and not killed and stop.seconds_since() > grace_s:
            log.error(f"torchrun did not stop within {grace_s:.0f}s of {stop.name}: killing it")
            _signal_group(proc, signal.SIGKILL)
            killed = True
        time.sleep(0.05)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _end_group(proc: subprocess.Popen) -> None:
    """Kill whatever is left of ``proc``'s process group, then reap ``proc`` (its ranks die with it)."""
    _signal_group(proc, signal.SIGKILL)
    proc.wait()
