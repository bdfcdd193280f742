"""Section 12 of the fault campaign: a lost rank. One rank of a 2-process training dies (SIGKILL) or hangs
(SIGSTOP: a wedged process, or a node gone without closing its connections) mid-training; the other rank must fail
within the collective timeout (``compute.collective_timeout_s``, carried by the spec to every rank's
``init_distributed``) instead of waiting forever, every torchrun agent must exit with a failure, and a rerun (what
the Dagster step's retry runs) must resume from the last complete checkpoint and train to the end.

Under ``strategy`` "fsdp" the tiny LDM trains with its denoiser sharded by FSDP2 and sharded (DCP) checkpoints,
each rank writing its own shards, and the rerun must resume from the newest checkpoint every rank committed; under
"ddp" the campaign's tiny autoencoder trains with single-file checkpoints. torchrun is run by hand on a spec, as the
launcher runs it, on one node (2 processes) or on two loopback "nodes" of one process each (two agents in one c10d
rendezvous: the lost rank's agent ends; the other node learns only through the broken collective). What bounds the
time from the fault to the survivor's failure:

- a rank that dies closes its connections, so the other ranks' collectives fail at once (gloo: "Connection closed by
  peer"); on its own node the agent also notices within its monitor interval and stops the group;
- a rank that hangs with its connections open is noticed by nobody but the collective's timeout: the others fail
  ``collective_timeout_s`` after they entered the collective it never joined. The hung rank itself is killed by its
  agent 30 s after the agent asked it to stop: on a worker's failure torch's agent stops the others with a fixed
  30 s timeout (``LocalElasticAgent._stop_workers``), not ``--shutdown-timeout``, so the agent, and with it the
  Dagster step, ends within ``collective_timeout_s`` + 30 s (+ its 0.1 s monitor interval).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from benchmarks.faults import campaign
from benchmarks.faults.dagster_trial import ROOT, wait_for_job
from benchmarks.faults.preemption import training_processes
from benchmarks.faults.table import Row, row
from ldm_core.text_encoder import TextEncoderConfig

GRACE_S = 3
"""torchrun's --shutdown-timeout in these trials (it applies to a stop signal, not to a rank's failure)."""
TEXT_ENCODER = TextEncoderConfig(max_length=8)
AGENT_STOP_S = 30.0
"""How long torch's agent waits, after one rank failed, for the others it asked to stop (fixed by torch)."""
MARGIN_S = 10.0
"""Room over the timeout for the survivor's own exit on a busy 2-core machine."""


def ldm_inputs(root: Path, images: int = 32) -> dict[str, str]:
    """The campaign's shapes dataset, a latent store of it encoded with the campaign's tiny VAE, and that VAE saved:
    {"dataset", "vae", "store"} (built once under ``root``)."""
    from benchmarks.faults import runner
    from ldm_core.bundle import save_autoencoder
    from ldm_core.data.latent_store.encoding import encode_dataset
    from ldm_core.data.latent_store.schema import LatentStoreConfig
    from ldm_core.text_encoder import TextEncoder

    out = {**campaign.prepare_inputs(root, images=images), "vae": str(root / "vae"), "store": str(root / "store")}
    if not (root / "store" / "latent_store.json").exists():
        vae = runner.encode_vae()
        save_autoencoder(out["vae"], vae)
        encode_dataset(
            out["dataset"],
            out["store"],
            vae,
            TextEncoder(TEXT_ENCODER),
            LatentStoreConfig(resolution=32, batch_size=8, dtype="fp32"),
            vae_identity=runner.VAE_IDENTITY,
        )
    return out


def _spec(
    workdir: Path, inputs: dict[str, str], strategy: str, steps: int, checkpoint_every: int, timeout_s: float
) -> tuple[Path, Any]:
    """The spec file of the trial's training, and the manager of its checkpoints."""
    from benchmarks.faults import runner
    from ldm_core.checkpoint import CheckpointManager
    from ldm_core.data.latent_store.schema import read_metadata
    from ldm_core.sharded_checkpoint import ShardedCheckpointManager
    from pipeline.distributed.specs import LdmTrainSpec, VaeTrainSpec

    where = {"checkpoint_dir": str(workdir / "ckpt"), "output_url": str(workdir / "out")}
    if strategy == "ddp":
        cfg = runner.ae_config(steps)
        cfg.trainer.checkpoint_every = checkpoint_every
        spec = VaeTrainSpec(
            training=cfg.to_dict(),
            dataset_url=inputs["dataset"],
            resolution=16,
            collective_timeout_s=timeout_s,
            **where,
        )
        checkpoints: Any = CheckpointManager(where["checkpoint_dir"])
    else:
        meta = read_metadata(inputs["store"])
        cfg = runner.ldm_config(steps)
        cfg.denoiser.context_dim = meta.context_shape[1]
        cfg.trainer.checkpoint_every = checkpoint_every
        cfg.trainer.strategy = strategy
        spec = LdmTrainSpec(
            training=cfg.to_dict(),
            store_url=inputs["store"],
            vae_url=inputs["vae"],
            text_encoder=TEXT_ENCODER.to_dict(),
            latent_shape=list(meta.latent_shape),
            guidance=1.0,
            validation_prompts=["a red square"],
            validation_seeds=1,
            collective_timeout_s=timeout_s,
            **where,
        )
        checkpoints = ShardedCheckpointManager(where["checkpoint_dir"])
    path = workdir / "spec.json"
    spec.to_json_file(path)
    return path, checkpoints


def _start(
    stage: str, spec_path: Path, processes: int, nodes: int, log_path: Path
) -> tuple[list[subprocess.Popen], Any]:
    """The agents of one training (one per node), each tied to this process and in a session of its own."""
    from pipeline.distributed.launch import local_node_commands
    from pipeline.distributed.lifetime import tied_command

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    log = open(log_path, "ab")  # noqa: SIM115 (closed by the caller)
    procs = [
        subprocess.Popen(
            tied_command(command), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        for command in local_node_commands(stage, processes, nodes, spec_path, GRACE_S)
    ]
    return procs, log


def _ranks(stage: str, procs: list[subprocess.Popen]) -> dict[int, psutil.Process]:
    """{global rank: its process} below the agents."""
    out = {}
    for proc in procs:
        for p in training_processes(proc.pid, stage)[1]:
            try:
                out[int(p.environ()["RANK"])] = p
            except (psutil.NoSuchProcess, KeyError):
                pass
    return out


def _end(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def rank_loss_trial(
    workdir: Path,
    inputs: dict[str, str],
    fault: str = "kill",
    nodes: int = 1,
    timeout_s: float = 30.0,
    steps: int = 12,
    after_step: int = 4,
    strategy: str = "ddp",
    deadline_s: float = 300.0,
) -> dict[str, Any]:
    """Rank 1 of 2 ranks (``nodes`` × 2/``nodes`` processes) SIGKILLed (``fault`` "kill") or SIGSTOPped ("hang")
    once step ``after_step`` is committed; then the same training run again. Returns the seconds from the fault to
    rank 0's end (``survivor_s``) and to every agent's end, the agents' exit statuses, the newest complete
    checkpoint before the rerun and the step the rerun resumed from, and whether it trained to the end. ``inputs``:
    `campaign.prepare_inputs`'s for "ddp", `ldm_inputs`' for "fsdp"."""
    workdir.mkdir(parents=True, exist_ok=True)
    stage = "vae" if strategy == "ddp" else "ldm"
    spec_path, ckpt = _spec(workdir, inputs, strategy, steps, after_step // 2 or 1, timeout_s)
    log_path = workdir / "torchrun.log"
    out: dict[str, Any] = {"fault": fault, "nodes": nodes, "strategy": strategy, "timeout_s": timeout_s}
    procs, log = _start(stage, spec_path, 2 // nodes, nodes, log_path)
    try:
        wait_for_job(
            lambda: max(ckpt.steps(), default=0) >= after_step,
            procs[0],
            f"a checkpoint at step {after_step}",
            log_path,
            deadline_s,
        )
        ranks = _ranks(stage, procs)
        out["ranks"] = len(ranks)
        t0 = time.monotonic()
        ranks[1].send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        _, alive = psutil.wait_procs([ranks[0]], timeout=timeout_s + MARGIN_S)
        out["survivor_s"] = None if alive else round(time.monotonic() - t0, 2)
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, timeout_s + AGENT_STOP_S + MARGIN_S - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                pass
        out["agents_s"] = round(time.monotonic() - t0, 2)
        out["agent_status"] = [proc.poll() for proc in procs]
    finally:
        if fault == "hang" and "ranks" in out:
            _continue_and_kill(ranks[1])
        _end(procs)
        log.close()
    text = log_path.read_text(errors="replace")
    out["timed_out_in_log"] = bool(re.search(r"[Tt]imed out", text))  # gloo: "Timed out waiting …ms for recv"
    out["committed_before_rerun"] = max(ckpt.steps(), default=0)
    # the rerun: what the step's retry runs (a fresh rendezvous, the same spec and checkpoints)
    retry_log = workdir / "retry.log"
    procs, log = _start(stage, spec_path, 2 // nodes, nodes, retry_log)
    try:
        for proc in procs:
            proc.wait(timeout=deadline_s)
    finally:
        _end(procs)
        log.close()
    retry = retry_log.read_text(errors="replace")
    resumed = re.findall(r"resumed \S+ training from step (\d+)", retry)
    out["resumed_from"] = int(resumed[0]) if resumed else None
    out["retry_status"] = [proc.returncode for proc in procs]
    out["retry_steps"] = max(ckpt.steps(), default=0)
    if any(out["retry_status"]):
        out["retry_log_tail"] = retry[-3000:]
    out["survived"] = bool(
        out["survivor_s"] is not None
        and out["survivor_s"] <= timeout_s + MARGIN_S
        and all(s not in (None, 0) for s in out["agent_status"])
        and out["resumed_from"] == out["committed_before_rerun"] > 0
        and out["retry_status"] == [0] * nodes
        and out["retry_steps"] == steps
    )
    return out


def _continue_and_kill(p: psutil.Process) -> None:
    """A stopped rank its agent could not end: never leave it behind."""
    try:
        p.send_signal(signal.SIGKILL)
        p.send_signal(signal.SIGCONT)
    except psutil.NoSuchProcess:
        pass


# ---------------------------------------------------------------------------------------------------------------
# The section
# ---------------------------------------------------------------------------------------------------------------

CASES = (("kill", 1, "fsdp"), ("kill", 2, "fsdp"), ("hang", 1, "fsdp"), ("kill", 1, "ddp"))
TIMEOUT_S = {"kill": 30.0, "hang": 10.0}


def rank_loss(root: Path, trials: int, rng: random.Random, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    inputs = ldm_inputs(root / "inputs")
    rows, details = [], []
    for fault, nodes, strategy in CASES:
        t0 = time.monotonic()
        done = []
        for i in range(trials):
            out = rank_loss_trial(
                root / f"{fault}-{nodes}-{strategy}-{i}",
                inputs,
                fault,
                nodes,
                timeout_s=TIMEOUT_S[fault],
                after_step=rng.choice(range(2, 8, 2)),
                strategy=strategy,
            )
            done.append(out)
            log(
                f"  {fault} rank 1, {nodes} node(s), trial {i}: rank 0 ended {out['survivor_s']}s after, "
                f"resumed from {out['resumed_from']} (newest complete {out['committed_before_rerun']})"
            )
        good = sum(o["survived"] for o in done)
        ended = [o["survivor_s"] for o in done if o["survivor_s"] is not None]
        where = "1 node × 2 processes" if nodes == 1 else "2 nodes × 1 process (loopback)"
        rows.append(
            row(
                "rank loss",
                f"{'SIGKILL' if fault == 'kill' else 'SIGSTOP'} to rank 1, {where}, {strategy}",
                trials,
                trials,
                good,
                f"{good}/{trials} rank 0 failed within the {TIMEOUT_S[fault]:.0f}s collective timeout, all agents "
                "failed, the rerun resumed from the newest complete checkpoint to the end",
                time.monotonic() - t0,
                f"fault to rank 0's end: max {max(ended, default=float('nan')):.1f}s",
            )
        )
        details.append({"fault": fault, "nodes": nodes, "strategy": strategy, "trials": done})
    return rows, details
