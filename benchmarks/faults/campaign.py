"""The kill campaign: run a real job (`benchmarks.faults.runner`) in a subprocess, SIGKILL it at random moments, resume
by rerunning the same command, and compare the result with an uninterrupted run's.

Used by the test suite (tests/faults/test_kill_resume.py, one or two trials per job) and by the fault script
(``python -m benchmarks.faults``, ten or more per job). What "equal" means per job:

- ``ae`` / ``ldm`` (the trainers): the newest checkpoint's whole state (weights, optimizer moments, EMA, RNG
  states, data position, counters) and the exported final weights are bitwise equal to the reference run's.
- ``encode`` (the latent store): the same rows in the same order, no id duplicated or missing, every tensor equal,
  and no shard on storage that the metadata does not name.
- ``ingest`` (the canonical dataset): the same set of (id, split, sha256) rows, none duplicated.

A kill is timed at random over the job's working window (from its READY line to its exit, measured on the
reference run): half the kills uniformly over the whole window (start-up of the first step, teardown and the final
saves included), half uniformly over the span of its steps / shards, so that many land mid-training: mid-step,
mid-checkpoint-write, between a shard and its manifest.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
JOBS = ("ae", "ldm", "encode", "ingest")
RUN_TIMEOUT = 300.0


# ---------------------------------------------------------------------------------------------------------------
# One run of a job, optionally killed
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class JobRun:
    returncode: int | None
    seconds: float
    """Wall time from start to exit."""
    window: float | None
    """Seconds from READY to exit (None when READY never came)."""
    killed: bool
    """SIGKILL was sent while the job was still running."""
    kill_after: float | None
    """Planned delay after READY."""
    last_progress: int | None
    """The last PROGRESS value printed before the end (the step or shard reached)."""
    done: bool
    progress_at: list[float] = field(default_factory=list)
    """Seconds after READY at which each PROGRESS line came."""
    stderr_tail: str = ""

    @property
    def phase(self) -> str:
        if not self.killed:
            return "finished before the kill" if self.kill_after is not None else "uninterrupted"
        # progress: the last step (trainers) or shard (encoding) completed; ingestion reports none
        return "killed before progress 1" if self.last_progress is None else f"killed at progress {self.last_progress}"


def runner_command(job: str, workdir: Path, inputs: dict[str, str]) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.faults.runner", job, str(workdir)]
    for k, v in inputs.items():
        cmd += [f"--{k}", v]
    return cmd


def run_job(
    cmd: list[str], kill_after: float | None = None, env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT
) -> JobRun:
    """Run ``cmd``; when ``kill_after`` is set, SIGKILL its process group that many seconds after READY."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    ready = threading.Event()
    state: dict[str, Any] = {"ready_at": None, "progress": None, "done": False, "progress_at": []}
    err: list[str] = []

    def read_stdout() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            line = line.strip()
            if line == "READY":
                state["ready_at"] = time.monotonic()
                ready.set()
            elif line.startswith("PROGRESS "):
                state["progress"] = int(line.split()[1])
                if state["ready_at"] is not None:
                    state["progress_at"].append(time.monotonic() - state["ready_at"])
            elif line == "DONE":
                state["done"] = True

    def read_stderr() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            err.append(line)
            del err[:-40]

    readers = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for r in readers:
        r.start()
    killed = False
    try:
        if kill_after is not None:
            deadline = t0 + timeout
            while not ready.wait(0.05):
                if proc.poll() is not None or time.monotonic() > deadline:
                    break
            if ready.is_set():
                try:
                    proc.wait(timeout=kill_after)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
        proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        for r in readers:
            r.join(timeout=5)
    end = time.monotonic()
    ready_at = state["ready_at"]
    return JobRun(
        returncode=proc.returncode,
        seconds=end - t0,
        window=None if ready_at is None else end - ready_at,
        killed=killed,
        kill_after=kill_after,
        last_progress=state["progress"],
        done=state["done"],
        progress_at=state["progress_at"],
        stderr_tail="".join(err)[-3000:],
    )


# ---------------------------------------------------------------------------------------------------------------
# Inputs and comparisons
# ---------------------------------------------------------------------------------------------------------------


def prepare_inputs(root: Path, images: int = 96) -> dict[str, str]:
    """The shared inputs of the encode and ingest jobs: a shapes source and its canonical dataset (8 rows a shard)."""
    from ldm_core.data import IngestConfig, ingest, write_shapes_source

    source, dataset = root / "inputs" / "source", root / "inputs" / "dataset"
    if not (dataset / "manifest.json").exists():
        write_shapes_source(str(source), images, seed=0)
        ingest(IngestConfig(source=str(source), rows_per_shard=8, val_fraction=0.25), str(dataset))
    return {"source": str(source), "dataset": str(dataset)}


def job_inputs(job: str, workdir: Path, shared: dict[str, str], store_url: str | None = None) -> dict[str, str]:
    if job == "encode":
        return {"dataset": shared["dataset"], "store": store_url or str(workdir / "store")}
    if job == "ingest":
        return {"source": shared["source"], "dataset": str(workdir / "dataset")}
    return {}


def compare_trainer(ref: Path, got: Path) -> tuple[bool, str]:
    """Newest checkpoint state and exported weights, bit for bit."""
    import torch

    from ldm_core.checkpoint import CheckpointManager, flatten_state
    from ldm_core.model_io import load_state_dict

    a, b = CheckpointManager(str(ref / "ckpt")).load_latest(), CheckpointManager(str(got / "ckpt")).load_latest()
    if a is None or b is None:
        return False, "no verifiable checkpoint"
    if a[0] != b[0]:
        return False, f"newest checkpoint is step {b[0]}, reference {a[0]}"
    (ta, sa), (tb, sb) = flatten_state(a[1]), flatten_state(b[1])
    if sa != sb:
        return False, "checkpoint skeletons differ (step, data position, config or counters)"
    if ta.keys() != tb.keys():
        return False, f"checkpoint tensors differ in keys: {sorted(ta.keys() ^ tb.keys())[:4]}"
    for k in ta:
        if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k]):
            return False, f"checkpoint tensor {k} differs"
    wa, wb = load_state_dict(str(ref / "final")), load_state_dict(str(got / "final"))
    if wa.keys() != wb.keys() or any(not torch.equal(wa[k], wb[k]) for k in wa):
        return False, "final weights differ"
    return True, f"step {a[0]}: {len(ta)} checkpoint tensors and {len(wa)} weights equal"


def store_rows(url: str) -> tuple[list[str], dict[str, Any]]:
    """Every row of a latent store in store order: ids and concatenated tensors."""
    import torch

    from ldm_core.data.latent_store import reader, schema

    store = reader.LatentStore(url)
    ids: list[str] = []
    tensors: dict[str, list] = {f: [] for f in schema.TENSOR_FIELDS}
    for k in range(len(store.shards)):
        ids += [r["id"] for r in store.read_rows(k)]
        for f, t in store.read_shard(k, schema.TENSOR_FIELDS).items():
            tensors[f].append(t)
    return ids, {f: torch.cat(v) for f, v in tensors.items() if v}


def compare_store(ref_url: str, got_url: str, expected_rows: int) -> tuple[bool, str]:
    import torch

    from ldm_core import storage
    from ldm_core.data.latent_store import schema

    ids_a, ta = store_rows(ref_url)
    ids_b, tb = store_rows(got_url)
    if len(set(ids_b)) != len(ids_b):
        return False, f"{len(ids_b) - len(set(ids_b))} duplicated rows"
    if len(ids_b) != expected_rows or set(ids_b) != set(ids_a):
        return False, f"{len(set(ids_a) - set(ids_b))} rows missing, {len(ids_b)} of {expected_rows} present"
    if ids_a != ids_b:
        return False, "rows are in a different order"
    for f in ta:
        if not torch.equal(ta[f], tb[f]):
            return False, f"{f} differs"
    meta = schema.read_metadata(got_url)
    on_disk = set(storage.list_dir(storage.join(got_url, schema.SHARDS_DIR)))
    named = {s.name for s in meta.shards if s.name}
    if on_disk != named:
        return False, f"shards on storage the metadata does not name: {sorted(on_disk - named)}"
    return True, f"{len(ids_b)} rows in {len(named)} shards equal"


def dataset_rows(url: str) -> list[tuple[str, str, str]]:
    from ldm_core.data import canonical

    manifest = canonical.read_manifest(url)
    rows: list[tuple[str, str, str]] = []
    for name in manifest.shard_names():
        t = canonical.read_shard(url, name, columns=["id", "split", "sha256"])
        rows += list(zip(*(t.column(c).to_pylist() for c in ("id", "split", "sha256"))))
    return rows


def compare_dataset(ref_url: str, got_url: str) -> tuple[bool, str]:
    a, b = dataset_rows(ref_url), dataset_rows(got_url)
    if len({r[0] for r in b}) != len(b):
        return False, f"{len(b) - len({r[0] for r in b})} duplicated rows"
    if sorted(a) != sorted(b):
        return False, f"{len(set(a) - set(b))} rows missing or different"
    return True, f"{len(b)} rows equal"


def stale_temp_files(workdir: Path) -> list[str]:
    """Temporary files of atomic writes that a kill left behind (never read, but they take space)."""
    return sorted(str(p.relative_to(workdir)) for p in workdir.rglob(".*.tmp"))


def compare(
    job: str, ref: Path, got: Path, shared: dict[str, str], ref_inputs: dict[str, str], got_inputs: dict[str, str]
) -> tuple[bool, str]:
    if job in ("ae", "ldm"):
        return compare_trainer(ref, got)
    if job == "encode":
        return compare_store(
            ref_inputs["store"], got_inputs["store"], expected_rows=len(dataset_rows(shared["dataset"]))
        )
    return compare_dataset(ref_inputs["dataset"], got_inputs["dataset"])


# ---------------------------------------------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Trial:
    job: str
    trial: int
    kills: list[dict[str, Any]] = field(default_factory=list)
    """Per kill attempt: planned delay after READY, whether it hit a running job, and where the job was."""
    runs: int = 0
    """Processes started (killed ones and the resume that finished)."""
    resumed_from: int | None = None
    """Trainers: the step the finishing run resumed from."""
    equal: bool = False
    detail: str = ""
    stale_temp_files: int = 0
    seconds: float = 0.0

    @property
    def faults(self) -> int:
        return sum(k["hit"] for k in self.kills)


@dataclass
class Reference:
    job: str
    workdir: Path
    inputs: dict[str, str]
    window: float
    """Seconds from READY to exit."""
    work_span: tuple[float, float] | None = None
    """(start, end) seconds after READY of the steps / shards (the first one's start estimated from the others'
    pace); None for a job that reports no progress."""


def reference_run(job: str, root: Path, shared: dict[str, str], env: dict[str, str] | None = None) -> Reference:
    workdir = root / job / "reference"
    inputs = job_inputs(job, workdir, shared)
    run = run_job(runner_command(job, workdir, inputs), env=env)
    if run.returncode != 0 or not run.done:
        raise RuntimeError(f"reference {job} run failed (rc {run.returncode}):\n{run.stderr_tail}")
    span = None
    if len(run.progress_at) >= 2:
        first, last = run.progress_at[0], run.progress_at[-1]
        pace = (last - first) / (len(run.progress_at) - 1)
        span = (max(0.0, first - pace), last)
    return Reference(job, workdir, inputs, run.window or run.seconds, span)


def kill_trial(
    ref: Reference,
    trial: int,
    root: Path,
    shared: dict[str, str],
    rng: random.Random | None = None,
    kills: int = 1,
    fractions: list[float] | None = None,
    env: dict[str, str] | None = None,
) -> Trial:
    """Start the job, SIGKILL it ``kills`` times (each rerun is killed again), then rerun it to completion and
    compare with the reference. Kill moments: drawn with ``rng`` as the module doc says, or the given ``fractions``
    of the reference's working window."""
    t0 = time.monotonic()
    job = ref.job
    workdir = root / job / f"trial-{trial:03d}"
    inputs = job_inputs(job, workdir, shared)
    cmd = runner_command(job, workdir, inputs)
    out = Trial(job, trial)
    rng = rng or random.Random(trial)
    if fractions is not None:
        delays = [f * ref.window for f in fractions]
    else:
        delays = [
            rng.uniform(*ref.work_span) if ref.work_span and rng.random() < 0.5 else rng.uniform(0.0, ref.window)
            for _ in range(kills)
        ]
    for delay in delays:
        run = run_job(cmd, kill_after=delay, env=env)
        out.runs += 1
        out.kills.append({"after_s": round(delay, 3), "hit": run.killed, "where": run.phase})
        if not run.killed and (run.returncode != 0 or not run.done):
            out.detail = f"run {out.runs} failed before the kill (rc {run.returncode}): {run.stderr_tail[-800:]}"
            out.seconds = time.monotonic() - t0
            return out
    final = run_job(cmd, env=env)
    out.runs += 1
    if final.returncode != 0 or not final.done:
        out.detail = f"the resumed run failed (rc {final.returncode}): {final.stderr_tail[-1500:]}"
    else:
        if job in ("ae", "ldm"):
            from ldm_core.model_io import read_model_meta

            out.resumed_from = read_model_meta(str(workdir / "final")).get("resumed_from")
        out.equal, out.detail = compare(job, ref.workdir, workdir, shared, ref.inputs, inputs)
    out.stale_temp_files = len(stale_temp_files(workdir))
    out.seconds = time.monotonic() - t0
    return out


def summarize(trials: list[Trial]) -> dict[str, dict[str, Any]]:
    """Per job: trials, kills that hit a running job, resumes equal to the reference, stale temp files."""
    out: dict[str, dict[str, Any]] = {}
    for t in trials:
        s = out.setdefault(
            t.job,
            {
                "trials": 0,
                "kills_sent": 0,
                "faults_hit": 0,
                "equal": 0,
                "survived": 0,
                "stale_temp_files": 0,
                "seconds": 0.0,
                "failures": [],
            },
        )
        s["trials"] += 1
        s["kills_sent"] += len(t.kills)
        s["faults_hit"] += t.faults
        s["equal"] += t.equal
        s["survived"] += t.faults if t.equal else 0
        s["stale_temp_files"] += t.stale_temp_files
        s["seconds"] += t.seconds
        if not t.equal:
            s["failures"].append(f"trial {t.trial}: {t.detail}")
    return out


def trial_json(t: Trial) -> dict[str, Any]:
    return {**asdict(t), "faults": t.faults}


def dump(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
