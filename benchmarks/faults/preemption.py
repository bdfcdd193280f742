"""Section 8 of the fault campaign: preemption. A training step gets SIGTERM, as Kubernetes sends it before a grace
period ends in SIGKILL, and must keep its work; a step process killed outright must take its torchrun ranks with it.

- ``sigterm_trial``: ``dagster job execute -o *vae_model`` (the in-process executor: the run process is the step
  process) on 1 process, or on 2 under torchrun, gets one SIGTERM at a random moment of vae_model's training. The
  step must commit a checkpoint within the grace period (the latency is measured: signal to the checkpoint's commit
  record), fail with `TrainingInterrupted` so that its RetryPolicy retries it (STEP_UP_FOR_RETRY), and the retry,
  in the same process here, must resume from that very checkpoint and register weights bit-equal to an
  uninterrupted run's.
- ``orphan_trial``: the same job on 2 processes; once the ranks train, the step process alone gets SIGKILL. No rank
  and no torchrun agent may be left alive a few seconds later.
- ``rank_sigterm_trial``: torchrun run by hand on a spec, SIGTERM to rank 1 alone (the agent signals the ranks one
  after the other, and each sees it at its own moment): every rank must stop at the same step (the stop is a
  collective), rank 0 commits that step's checkpoint, and every rank exits.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import yaml

from benchmarks.faults import campaign
from benchmarks.faults.dagster_trial import (
    ROOT,
    asset_metadata,
    dagster_run_ids,
    fresh_home,
    home_env,
    job_command,
    kill_config,
    reference_vae_weights,
    wait_for_job,
)
from benchmarks.faults.table import Row, row

GRACE_S = 20
"""The grace the trials allow from SIGTERM to the committed checkpoint (the tiny configs need about a second; the
rest is room for a shared, busy machine)."""
CHECKPOINT_EVERY = 3
VAE_STEPS = 24


def checkpoint_dir_commits(home: Path, stage: str = "vae") -> dict[int, float]:
    """{step: wall time of its commit record} in ``stage``'s checkpoint directories."""
    out = {}
    for p in (home / "storage" / "checkpoints" / stage).glob("*/step-*.sha256"):
        if m := re.match(r"step-(\d+)\.sha256", p.name):
            try:
                out[int(m.group(1))] = p.stat().st_mtime
            except FileNotFoundError:  # pruned meanwhile
                pass
    return out


def training_processes(pid: int, stage: str = "vae") -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(torchrun agents, ranks) below ``pid``."""
    agents, ranks = [], []
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return [], []
    for p in children:
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if f"pipeline.distributed.train_{stage}" in cmd and "torch.distributed.run" not in cmd:
            ranks.append(p)
        elif "torch.distributed.run" in cmd:
            agents.append(p)
    return agents, ranks


def _config(processes: int, vae_steps: int) -> dict[str, Any]:
    config = kill_config(vae_steps, only_vae=True)
    config["ops"]["vae_model"]["config"]["training"]["trainer"]["checkpoint_every"] = CHECKPOINT_EVERY
    config["resources"] = {"compute": {"config": {"num_processes": processes, "termination_grace_s": GRACE_S}}}
    return config


def _start(workdir: Path, processes: int, vae_steps: int) -> tuple[Path, dict[str, Any], subprocess.Popen, Any]:
    home = fresh_home(workdir / "home")
    config = _config(processes, vae_steps)
    path = workdir / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(workdir / "job.log", "wb")  # noqa: SIM115 (closed by the caller)
    proc = subprocess.Popen(
        job_command(path, only_vae=True),
        cwd=ROOT,
        env=home_env(home),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return home, config, proc, log


def _retry_errors(home: Path, run_id: str) -> list[str]:
    """The errors of vae_model's attempts that Dagster put up for retry."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY).records
        return [
            json.dumps(r.event_log_entry.dagster_event.event_specific_data.error.to_string())
            for r in records
            if r.event_log_entry.dagster_event.step_key == "vae_model"
        ]


def sigterm_trial(
    workdir: Path,
    processes: int = 1,
    after_step: int = CHECKPOINT_EVERY,
    delay_s: float = 0.0,
    vae_steps: int = VAE_STEPS,
    reference: dict[str, Any] | None = None,
    timeout: float = 400.0,
) -> dict[str, Any]:
    """SIGTERM to the step process ``delay_s`` after vae_model committed its checkpoint at ``after_step``; then the run
    goes on (its retry) to the end. ``reference``: the uninterrupted run's weights (None: trained here, in process,
    for 1 process; not compared for 2)."""
    import torch

    from ldm_core.model_io import load_state_dict

    workdir.mkdir(parents=True, exist_ok=True)
    home, config, proc, log = _start(workdir, processes, vae_steps)
    out: dict[str, Any] = {"processes": processes, "after_step": after_step, "delay_s": round(delay_s, 3)}
    try:
        wait_for_job(
            lambda: max(checkpoint_dir_commits(home), default=0) >= after_step,
            proc,
            f"a checkpoint at step {after_step}",
            workdir / "job.log",
            timeout,
        )
        time.sleep(delay_s)
        before = checkpoint_dir_commits(home)
        if processes > 1:
            out["ranks_at_signal"] = len(training_processes(proc.pid)[1])
        sent = time.time()
        os.kill(proc.pid, signal.SIGTERM)  # the step process only, as the kubelet signals a container's process
        # the stop the trainer reports (TrainingInterrupted's message), and the commit record of that step's
        # checkpoint, both looked for within the grace period (the retry's own checkpoints come 10 s later or more)
        commits: dict[int, float] = {}
        stop_step = None
        deadline = time.monotonic() + GRACE_S
        while stop_step is None and time.monotonic() < deadline and proc.poll() is None:
            commits.update({s: t for s, t in checkpoint_dir_commits(home).items() if s not in before})
            if m := re.search(r"stopped on SIGTERM at step (\d+)", (workdir / "job.log").read_text(errors="replace")):
                stop_step = int(m.group(1))
            time.sleep(0.01)
        commits.update({s: t for s, t in checkpoint_dir_commits(home).items() if s not in before})
        out["steps_before_signal"] = sorted(before)
        out["stop_step"] = stop_step
        out["latency_s"] = round(commits[stop_step] - sent, 3) if stop_step in commits else None
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    text = (workdir / "job.log").read_text(errors="replace")
    out["run_success"] = proc.returncode == 0 and "RUN_SUCCESS" in text
    if not out["run_success"]:
        out["log_tail"] = text[-3000:]
        return out
    (run_id,) = dagster_run_ids(home)
    errors = _retry_errors(home, run_id)
    out["retried"] = len(errors)
    out["retried_on_training_interrupted"] = bool(errors) and "TrainingInterrupted" in errors[0]
    md = asset_metadata(home, "vae_model")
    out["resumed_from"], out["steps"] = md["resumed_from"], md["steps"]
    out["resumed_from_stop_step"] = out["stop_step"] is not None and md["resumed_from"] == out["stop_step"]
    got = load_state_dict(md["vae_url"])
    if reference is None and processes == 1:
        name = config["ops"]["image_dataset"]["config"].get("name", "default")
        dataset_url = str(home / "storage" / "datasets" / name)
        reference = reference_vae_weights(config, dataset_url)
    if reference is not None:
        out["weights_equal"] = got.keys() == reference.keys() and all(
            torch.equal(got[k], reference[k]) for k in reference
        )
    out["weights"] = got
    out["within_grace"] = out["latency_s"] is not None and out["latency_s"] <= GRACE_S
    out["survived"] = bool(
        out["within_grace"]
        and out["retried_on_training_interrupted"]
        and out["resumed_from_stop_step"]
        and out.get("weights_equal", True)
    )
    return out


def uninterrupted_weights(
    workdir: Path, processes: int, vae_steps: int = VAE_STEPS, timeout: float = 400.0
) -> dict[str, Any]:
    """The registered weights of the same job run to the end without a signal."""
    from ldm_core.model_io import load_state_dict

    workdir.mkdir(parents=True, exist_ok=True)
    home, _, proc, log = _start(workdir, processes, vae_steps)
    try:
        proc.wait(timeout=timeout)
    finally:
        log.close()
    if proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{(workdir / 'job.log').read_text()[-3000:]}")
    return load_state_dict(asset_metadata(home, "vae_model")["vae_url"])


def orphan_trial(
    workdir: Path, vae_steps: int = 200, after_step: int = CHECKPOINT_EVERY, timeout: float = 400.0
) -> dict[str, Any]:
    """SIGKILL to the step process alone while its 2 ranks train: {"pids": …, "alive_after": pids still running
    ``wait_s`` later, "seconds": how long they took to go}."""
    workdir.mkdir(parents=True, exist_ok=True)
    home, _, proc, log = _start(workdir, 2, vae_steps)
    out: dict[str, Any] = {}
    try:
        wait_for_job(
            lambda: max(checkpoint_dir_commits(home), default=0) >= after_step,
            proc,
            f"a checkpoint at step {after_step}",
            workdir / "job.log",
            timeout,
        )
        agents, ranks = training_processes(proc.pid)
        out["agents"], out["ranks"] = len(agents), len(ranks)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        gone, alive = psutil.wait_procs(agents + ranks, timeout=5.0)
        out["seconds"] = round(time.monotonic() - t0, 3)
        out["alive_after"] = [p.pid for p in alive]
        for p in alive:  # the test's own cleanup: never leave them training
            p.kill()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    out["survived"] = out.get("ranks") == 2 and out.get("agents", 0) >= 1 and out["alive_after"] == []
    return out


# ---------------------------------------------------------------------------------------------------------------
# torchrun by hand: SIGTERM to one rank
# ---------------------------------------------------------------------------------------------------------------


def rank_sigterm_trial(
    workdir: Path, dataset_url: str, steps: int = 400, after_step: int = 2, timeout: float = 300.0
) -> dict[str, Any]:
    """``torchrun --nproc-per-node 2 -m pipeline.distributed.train_vae spec.json`` (the campaign's tiny autoencoder,
    no Dagster), SIGTERM to rank 1 alone once step ``after_step`` is committed: the step every rank stopped at and
    whether rank 0 committed it, every process's end, and the seconds they took."""
    from benchmarks.faults import runner
    from ldm_core.checkpoint import CheckpointManager
    from pipeline.distributed.launch import torchrun_command
    from pipeline.distributed.lifetime import tied_command
    from pipeline.distributed.specs import VaeTrainSpec

    workdir.mkdir(parents=True, exist_ok=True)
    cfg = runner.ae_config(steps)
    cfg.trainer.checkpoint_every = after_step
    ckpt = workdir / "ckpt"
    spec = VaeTrainSpec(
        training=cfg.to_dict(),
        dataset_url=dataset_url,
        resolution=16,
        checkpoint_dir=str(ckpt),
        output_url=str(workdir / "out"),
    )
    spec.to_json_file(workdir / "spec.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    log = open(workdir / "torchrun.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        tied_command(torchrun_command("vae", 2, workdir / "spec.json", GRACE_S)),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out: dict[str, Any] = {}
    try:
        wait_for_job(
            lambda: max(CheckpointManager(str(ckpt)).steps(), default=0) >= after_step,
            proc,
            f"a checkpoint at step {after_step}",
            workdir / "torchrun.log",
            timeout,
        )
        _, ranks = training_processes(proc.pid)
        rank1 = [p for p in ranks if p.environ().get("RANK") == "1"]
        out["ranks"] = len(ranks)
        before = set(CheckpointManager(str(ckpt)).steps())
        t0 = time.monotonic()
        rank1[0].send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        out["seconds"] = round(time.monotonic() - t0, 3)
        out["exited_within_grace"] = proc.poll() is not None
        after = set(CheckpointManager(str(ckpt)).steps())
        out["new_checkpoints"] = sorted(after - before)
        text = (workdir / "torchrun.log").read_text(errors="replace")
        stops = [int(s) for s in re.findall(r"stopped on SIGTERM at step (\d+)", text)]
        out["stop_steps"] = stops  # rank 0 reports its stop (TrainingInterrupted's message)
        out["ranks_exit_interrupted"] = len(re.findall(r"exitcode\s*:\s*75", text))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    out["survived"] = bool(
        out.get("exited_within_grace")
        and len(out.get("stop_steps", [])) == 1
        and out["new_checkpoints"]
        and max(out["new_checkpoints"]) == out["stop_steps"][0]
        and out["ranks_exit_interrupted"] == 2
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# The section
# ---------------------------------------------------------------------------------------------------------------


def preemption(root: Path, trials: int, rng: random.Random, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    rows, details = [], []
    for processes in (1, 2):
        t0 = time.monotonic()
        ref = uninterrupted_weights(root / f"reference-{processes}", processes) if processes > 1 else None
        done = []
        for i in range(trials):
            after = rng.choice(range(CHECKPOINT_EVERY, VAE_STEPS - CHECKPOINT_EVERY, CHECKPOINT_EVERY))
            out = sigterm_trial(
                root / f"sigterm-{processes}-{i}",
                processes,
                after_step=after,
                delay_s=rng.uniform(0.0, 1.0),
                reference=ref,
            )
            out.pop("weights", None)
            done.append(out)
            log(
                f"  SIGTERM, {processes} process(es), trial {i}: stop at step {out.get('stop_step')} "
                f"({out.get('latency_s')}s after the signal), resumed_from {out.get('resumed_from')}, "
                f"equal {out.get('weights_equal')}"
            )
        good = sum(bool(o.get("survived")) for o in done)
        latencies = [o["latency_s"] for o in done if o.get("latency_s") is not None]
        case = f"SIGTERM to the vae_model step, {processes} process{'es' if processes > 1 else ''}"
        rows.append(
            row(
                "preemption",
                case,
                trials,
                trials,
                good,
                f"{good}/{trials} checkpoint within {GRACE_S}s, retried, resumed there, bitwise equal",
                time.monotonic() - t0,
                f"signal to committed checkpoint: max {max(latencies, default=float('nan')):.2f}s, "
                f"mean {sum(latencies) / max(1, len(latencies)):.2f}s",
            )
        )
        details.append({"processes": processes, "trials": done})
    t0 = time.monotonic()
    shared = campaign.prepare_inputs(root / "inputs", images=32)
    ranks = [
        rank_sigterm_trial(root / f"rank-sigterm-{i}", shared["dataset"], after_step=rng.choice(range(2, 8)))
        for i in range(trials)
    ]
    good = sum(o["survived"] for o in ranks)
    rows.append(
        row(
            "preemption",
            "SIGTERM to rank 1 alone (torchrun, 2 processes)",
            trials,
            trials,
            good,
            f"{good}/{trials} every rank stopped at one step, rank 0 checkpointed it, all exited",
            time.monotonic() - t0,
            f"all exited within {max(o.get('seconds', 0) for o in ranks):.2f}s",
        )
    )
    details.append({"rank_sigterm": ranks})
    t0 = time.monotonic()
    orphans = [orphan_trial(root / f"orphan-{i}") for i in range(max(1, trials // 2))]
    good = sum(o["survived"] for o in orphans)
    rows.append(
        row(
            "preemption",
            "SIGKILL to the step process alone, 2 processes",
            len(orphans),
            len(orphans),
            good,
            f"{good}/{len(orphans)} no rank or agent left",
            time.monotonic() - t0,
            f"gone after at most {max(o.get('seconds', 0) for o in orphans):.2f}s",
        )
    )
    details.append({"orphans": orphans})
    return rows, details


if __name__ == "__main__":  # one trial of each, for a look by hand
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(sigterm_trial(Path(d) / "one", 1), file=sys.stderr)
