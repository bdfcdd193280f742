"""The one choice the GPU assets make: train in the asset's process, or on N processes under torchrun.

``train(context, compute, spec, tracker)`` runs ``spec.train(tracker)`` in-process when the compute resource asks for
one process; for more it writes the spec to a file and runs

    python -m torch.distributed.run --standalone --nproc-per-node N -m pipeline.distributed.train_<stage> spec.json

in a Dagster Pipes session (`run_torchrun`): rank 0's progress lines arrive in the run log as they happen, its metrics
in the asset's MLflow run, and its train result and metadata come back when it ends. Either way the asset gets the
same train result (the model loaded from the spec's ``output_url``) and carries on exactly as in-process.

With ``compute.nodes`` M > 1, each of M torchrun agents runs N = ``num_processes`` ranks and the agents meet in a
c10d rendezvous (`pipeline.distributed.torchrun`). The local launcher starts the M agents here, on loopback, each
tied to the step process as the single agent is, all in the one Pipes session (every agent gets the same bootstrap
environment; only global rank 0 opens Pipes): the code path of M machines, on one. A stop signal goes to every agent,
the step waits for all of them, and once one fails the others are ended, as Kubernetes ends a failed Job's other
pods. With ``compute.launcher`` "k8s" the agents run in the pods of an indexed Job instead
(`pipeline.distributed.k8s`). Every rank joins its process group with ``compute.collective_timeout_s``: a rank that
dies or hangs makes the others fail within it instead of waiting forever.

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
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import dagster as dg

from ldm_core import storage
from ldm_core.tracking import Tracker
from ldm_core.trainers.preemption import StopRequest, TrainingInterrupted, stop_on_signals
from pipeline.distributed import k8s, lifetime
from pipeline.distributed.entry import INTERRUPTED_MESSAGE, RESULT_MESSAGE
from pipeline.distributed.specs import LdmTrainSpec, VaeTrainSpec, result_from_summary
from pipeline.distributed.torchrun import Rendezvous, torchrun_command
from pipeline.resources import ComputeResource

LOOPBACK = "127.0.0.1"

__all__ = ["local_node_commands", "run_torchrun", "torchrun_command", "train"]


def _for_processes(spec: VaeTrainSpec | LdmTrainSpec, compute: ComputeResource) -> VaeTrainSpec | LdmTrainSpec:
    """The spec as every rank reads it: each rank picks its own GPU (LOCAL_RANK), so a device pinned to one GPU
    index becomes plain "cuda"; the collective timeout of the compute resource."""
    trainer = dict(spec.training.get("trainer") or {})
    if str(trainer.get("device", "auto")).startswith("cuda:"):
        trainer["device"] = "cuda"
    return spec.model_copy(
        update={
            "training": {**spec.training, "trainer": trainer},
            "collective_timeout_s": float(compute.collective_timeout_s),
        }
    )


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_node_commands(stage: str, processes: int, nodes: int, spec_path: str | Path, grace_s: int) -> list[list[str]]:
    """One torchrun command per node, every node on this machine: ``--standalone`` for one node; for more, agents
    of one c10d rendezvous on loopback, node 0 hosting its store on a free port. Node i's address is 127.0.0.(i+1)
    (all of 127/8 is loopback on Linux): torch orders the nodes' ranks by address, so node 0 holds rank 0."""
    if nodes == 1:
        return [torchrun_command(stage, processes, spec_path, grace_s)]
    endpoint, run_id = f"{LOOPBACK}:{free_port()}", f"ldm-{uuid.uuid4().hex[:12]}"
    return [
        torchrun_command(
            stage,
            processes,
            spec_path,
            grace_s,
            Rendezvous(nodes, endpoint, run_id, local_addr=f"127.0.0.{node + 1}", is_host=node == 0),
        )
        for node in range(nodes)
    ]


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
    processes, nodes = compute.process_count(), compute.node_count()
    if processes == 1 and nodes == 1:
        return spec.train(tracker, **in_process), {"processes": 1, "launcher": "in-process"}
    spec = _for_processes(spec, compute)
    if compute.launcher == "k8s":
        invocation, returncode, stop = k8s.run_training_job(context, compute, spec, processes, nodes)
    else:
        invocation, returncode, stop = _run_local(context, compute, spec, processes, nodes)
    result, reported = _outcome(spec, invocation, returncode, stop, compute.termination_grace_s)
    return result, {**reported, "processes": processes * nodes, "nodes": nodes, "launcher": "torchrun"}


def _run_local(
    context: dg.AssetExecutionContext,
    compute: ComputeResource,
    spec: VaeTrainSpec | LdmTrainSpec,
    processes: int,
    nodes: int,
) -> tuple[dg.PipesClientCompletedInvocation, int, StopRequest]:
    # CPU threads per rank: torchrun would set 1; share the cores out instead unless the resource says otherwise
    threads = compute.threads or max(1, (os.cpu_count() or 1) // (processes * nodes))
    grace = compute.termination_grace_s
    with tempfile.TemporaryDirectory(prefix="ldm-spec-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec.to_json_file(spec_path)
        commands = local_node_commands(spec.stage, processes, nodes, spec_path, grace)
        where = f"{nodes} nodes × {processes} processes" if nodes > 1 else f"{processes} processes"
        context.log.info(f"training {spec.stage} on {where}: " + " | ".join(" ".join(c) for c in commands))
        return run_torchrun(context, commands, {"OMP_NUM_THREADS": str(threads)}, grace)


def _outcome(
    spec: VaeTrainSpec | LdmTrainSpec,
    invocation: dg.PipesClientCompletedInvocation,
    returncode: int,
    stop: StopRequest,
    grace: int,
) -> tuple[Any, dict[str, Any]]:
    """The train result and rank 0's metadata, or the error the step fails with."""
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
    return result, reported


def run_torchrun(
    context: dg.AssetExecutionContext, commands: list[list[str]], env: dict[str, str], grace_s: float
) -> tuple[dg.PipesClientCompletedInvocation, int, StopRequest]:
    """Run ``commands`` (torchrun agents, one per node) in one Pipes session, as ``dg.PipesSubprocessClient`` runs
    one command, but tied to this process: each in a session of its own and with a parent-death signal
    (`pipeline.distributed.lifetime`), its process group killed when it ends or this returns early. A SIGTERM or
    SIGINT here is forwarded to every agent as SIGTERM, and they get ``grace_s`` from the signal to exit before
    their groups are killed. (Dagster's own client forwards a SIGINT to the agent alone, waits 20 seconds, and leaves
    the ranks behind when this process is killed outright.)

    (the invocation, the first non-zero exit status of an agent or 0, the stop request that records any signal)."""
    with dg.open_pipes_session(
        context=context,
        context_injector=dg.PipesTempFileContextInjector(),
        message_reader=dg.PipesTempFileMessageReader(),
    ) as session:
        with stop_on_signals() as stop:
            procs: list[subprocess.Popen] = []
            try:
                for command in commands:
                    procs.append(
                        subprocess.Popen(
                            lifetime.tied_command(command),
                            start_new_session=True,
                            env={**os.environ, **env, **session.get_bootstrap_env_vars()},
                        )
                    )
                _wait_forwarding_stop(procs, stop, grace_s, context.log)
            finally:
                for proc in procs:
                    _end_group(proc)
    failed = [p.returncode for p in procs if p.returncode != 0]
    return dg.PipesClientCompletedInvocation(session), failed[0] if failed else 0, stop


def _exited(proc: subprocess.Popen) -> int | None:
    """``proc``'s exit status once it has exited (left unreaped, so its process group id stays its own)."""
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _wait_forwarding_stop(procs: list[subprocess.Popen], stop: StopRequest, grace_s: float, log: Any) -> None:
    """Until every agent in ``procs`` exits: on a stop signal, SIGTERM to each one's group, and SIGKILL once
    ``grace_s`` has passed since the signal. Once one agent failed, the training is lost on every node: the others'
    groups are killed (what Kubernetes does to the other pods of a failed Job) rather than left to notice."""
    forwarded = killed = False
    while running := [p for p in procs if _exited(p) is None]:
        failed = [p for p in procs if p not in running and _exited(p) != 0]
        if failed and not stop.requested and not killed:
            log.error(f"a torchrun agent exited with status {_exited(failed[0])}: ending the other nodes' agents")
            for p in running:
                _signal_group(p, signal.SIGKILL)
            killed = True
        if stop.requested and not forwarded:
            log.warning(f"{stop.name}: asking torchrun to checkpoint and stop (up to {grace_s:.0f}s)")
            for p in running:
                _signal_group(p, signal.SIGTERM)
            forwarded = True
        if forwarded and not killed and stop.seconds_since() > grace_s:
            log.error(f"torchrun did not stop within {grace_s:.0f}s of {stop.name}: killing it")
            for p in running:
                _signal_group(p, signal.SIGKILL)
            killed = True
        time.sleep(0.05)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _end_group(proc: subprocess.Popen) -> None:
    """Kill whatever is left of ``proc``'s process group, then reap ``proc`` (its ranks die with it)."""
    _signal_group(proc, signal.SIGKILL)
    proc.wait()
