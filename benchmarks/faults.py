"""The fault campaign: kill, corrupt, starve and misconfigure the pipeline, and check that it survives every time.

    python -m benchmarks.faults [--trials 10] [--seed 0] [--quick] [--only kills,storage,...]
                                [--json benchmarks/results/faults.json] [--workdir DIR]

Sections (each row of the table is one kind of fault; "faults" counts the faults that actually hit, "survived"
those after which the outcome was exactly the right one):

1. kills: each job (train_autoencoder, train_ldm, encode_dataset, ingest) in a subprocess, SIGKILLed at moments
   drawn uniformly over its working window (1 or 2 kills per trial), resumed by rerunning the same command, compared
   with an uninterrupted run: trainers bit for bit (whole checkpoint state + exported weights), the latent store and
   the dataset row for row (`tests.faults.campaign`).
2. dagster: `dagster job execute -j ldm_training_job` killed during vae_model training, and during ldm_model
   training, then rerun: the rerun resumes from the checkpoint (resumed_from > 0; for ldm_model the autoencoder is
   reused and nothing re-encoded), nothing was registered before, and the weights equal an uninterrupted training
   bit for bit (`tests.faults.dagster_trial`).
3. atomic writes: a process rewriting an 8 MiB artifact, SIGKILLed mid-write over and over: the artifact is always
   one whole version; the temp files the kills leave are removed by the next writer.
4. corrupt checkpoints: the newest checkpoint truncated, bit-flipped, or without its commit record (and every
   checkpoint corrupt): the trainer falls back with a warning and still ends bit-equal to an uninterrupted run.
5. storage: ingestion, the Zarr latent store and trainer checkpoints on s3:// (moto) behind a proxy that fails
   every 3rd request with one fault kind (500, 503, reset, request lost after it took effect, slow) and then all
   mixed at every 2nd: the work completes equal to a fault-free local run. Permanent errors (403, NoSuchBucket,
   resets, 503 forever): the error names the URL, earlier writes stay intact, and the work completes once healed.
6. numerical: isolated NaN batches are skipped and counted (the count checked against the sampler's own order);
   data that turns NaN for good stops the run with the last good checkpoint intact and resumable.
7. configs: every bad field of `tests.faults.bad_configs` fails validation naming its field; `ldm demo` and a
   `dagster job execute` with a bad config fail before any work.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread: subprocess jobs and in-process references agree

import torch

from benchmarks.common import machine_info, print_table, write_json
from tests.faults import campaign, runner

SECTIONS = ("kills", "dagster", "atomic", "checkpoints", "storage", "numerical", "configs")
Row = dict[str, Any]


def _row(category: str, case: str, trials: int, faults: int, survived: int, result: str, seconds: float,
         notes: str = "") -> Row:
    return {"category": category, "case": case, "trials": trials, "faults": faults, "survived": survived,
            "result": result, "seconds": round(seconds, 1), "notes": notes}


# ---------------------------------------------------------------------------------------------------------------
# 1. Kills
# ---------------------------------------------------------------------------------------------------------------

JOB_NAMES = {"ae": "train_autoencoder", "ldm": "train_ldm", "encode": "encode_dataset", "ingest": "ingest"}


def kills(root: Path, trials: int, rng: random.Random, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    shared = campaign.prepare_inputs(root)
    rows, details = [], []
    for job in campaign.JOBS:
        t0 = time.monotonic()
        ref = campaign.reference_run(job, root, shared)
        done = []
        for i in range(trials):
            t = campaign.kill_trial(ref, i, root, shared, rng, kills=1 + i % 2)
            done.append(t)
            log(f"  {job} trial {i}: {[k['where'] for k in t.kills]} -> {'equal' if t.equal else 'DIFFERENT'} ({t.detail})")
            shutil.rmtree(root / job / f"trial-{i:03d}", ignore_errors=True)
        s = campaign.summarize(done)[job]
        resumed = sum(1 for t in done if t.resumed_from)
        notes = (f"{s['kills_sent']} kills sent, {s['faults_hit']} hit a running job; window {ref.window:.1f}s"
                 + (f"; {resumed} resumed from a checkpoint" if job in ("ae", "ldm") else "")
                 + (f"; stale temp files left: {s['stale_temp_files']}" if s["stale_temp_files"] else ""))
        equal_word = "bitwise equal" if job in ("ae", "ldm") else "row-exact"
        rows.append(_row("kill + resume", JOB_NAMES[job], s["trials"], s["faults_hit"], s["survived"],
                         f"{s['equal']}/{s['trials']} {equal_word}", time.monotonic() - t0, notes))
        details.append({"job": job, "reference_window_s": ref.window, "summary": s,
                        "trials": [campaign.trial_json(t) for t in done]})
    return rows, details


# ---------------------------------------------------------------------------------------------------------------
# 2. Dagster
# ---------------------------------------------------------------------------------------------------------------

def dagster(root: Path, trials: int, rng: random.Random, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    from tests.faults.dagster_trial import dagster_kill_trial

    rows, outs = [], []
    for asset in ("vae_model", "ldm_model"):
        t0, done = time.monotonic(), []
        for i in range(trials):
            if asset == "vae_model":
                kill_at = rng.choice(range(2, 20, 2))
                out = dagster_kill_trial(root / f"{asset}-{i}", kill_at_step=kill_at, vae_steps=24)
            else:
                kill_at = rng.choice(range(5, 35, 5))
                out = dagster_kill_trial(root / f"{asset}-{i}", asset=asset, kill_at_step=kill_at, vae_steps=6,
                                         ldm_steps=40)
            ok = (out.get("rerun_success") and out["registered_after_kill"] == 0 and out["resumed_from"] >= kill_at
                  and out["weights_equal"] and out["registry_points_at_complete_model"]
                  and (asset == "vae_model" or (out["vae_reused"] and out["store_rows_new"] == 0)))
            out["ok"] = bool(ok)
            done.append(out)
            log(f"  dagster {asset} trial {i}: killed after step {out['killed_after_step']}, resumed_from "
                f"{out.get('resumed_from')}, weights equal {out.get('weights_equal')}")
        good = sum(o["ok"] for o in done)
        notes = "; ".join(f"killed at step {o['killed_after_step']}, resumed_from {o.get('resumed_from')}" for o in done)
        extra = "" if asset == "vae_model" else ", VAE reused, 0 rows re-encoded"
        rows.append(_row("kill + resume", f"dagster job execute ldm_training_job, in {asset}", trials, trials, good,
                         f"{good}/{trials} resumed, bitwise equal{extra}, nothing registered before",
                         time.monotonic() - t0, notes))
        outs += done
    return rows, outs


# ---------------------------------------------------------------------------------------------------------------
# 3. Atomic writes
# ---------------------------------------------------------------------------------------------------------------

def atomic(root: Path, kills_n: int, rng: random.Random, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    from ldm_core import storage
    from tests.faults.injectors import WRITE_LOOP, whole_version

    t0 = time.monotonic()
    d = root / "atomic"
    d.mkdir(parents=True, exist_ok=True)
    target = d / "artifact.bin"
    whole, versions = 0, set()
    for _ in range(kills_n):
        proc = subprocess.Popen([sys.executable, "-c", WRITE_LOOP, str(target), str(8 << 20)], cwd=campaign.ROOT,
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        data = target.read_bytes()
        whole += whole_version(data)
        versions.add(int(data[:16]))
    leftovers = len([p for p in d.iterdir() if p.name != target.name])
    removed = storage.remove_stale_temp_files(str(d))
    clean = [p.name for p in d.iterdir()] == [target.name]
    result = f"{whole}/{kills_n} whole; {leftovers} temp files left by kills, {len(removed)} removed"
    return [_row("atomic write", "write_bytes_atomic under SIGKILL (8 MiB)", kills_n, kills_n, whole if clean else 0,
                 result, time.monotonic() - t0, f"{len(versions)} distinct versions seen")], \
        {"kills": kills_n, "whole": whole, "leftovers": leftovers, "removed": len(removed)}


# ---------------------------------------------------------------------------------------------------------------
# 4. Corrupt checkpoints
# ---------------------------------------------------------------------------------------------------------------

def _train(job: str, data, ckpt: Path, steps: int, stop_at: int | None = None, max_nonfinite: int | None = None):
    from ldm_core.trainers.autoencoder import train_autoencoder
    from ldm_core.trainers.ldm import train_ldm

    stop = (lambda s: s == stop_at) if stop_at else None
    if job == "ae":
        cfg = runner.ae_config(steps)
        if max_nonfinite is not None:
            cfg.trainer.max_nonfinite_steps = max_nonfinite
        return train_autoencoder(cfg, data, checkpoint_dir=str(ckpt), perceptual=None, should_stop=stop)
    cfg = runner.ldm_config(steps)
    if max_nonfinite is not None:
        cfg.trainer.max_nonfinite_steps = max_nonfinite
    return train_ldm(cfg, data, uncond=runner.ldm_data()[1], checkpoint_dir=str(ckpt), should_stop=stop)


def _clean_data(job: str):
    return runner.ae_data() if job == "ae" else runner.ldm_data()[0]


def _same_weights(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _damage(ckpt: Path, how: str) -> None:
    body = ckpt / "step-000000004.safetensors"
    if how == "truncate":
        body.write_bytes(body.read_bytes()[: body.stat().st_size // 2])
    elif how == "flip_byte":
        data = bytearray(body.read_bytes())
        data[len(data) // 2] ^= 0xFF
        body.write_bytes(bytes(data))
    elif how == "no_commit_record":
        (ckpt / "step-000000004.sha256").unlink()
    else:  # every checkpoint
        for p in ckpt.glob("*.safetensors"):
            p.write_bytes(b"garbage")


def checkpoints(root: Path, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    rows, details = [], []
    logging.getLogger("ldm_core.checkpoint").setLevel(logging.WARNING)
    for job in ("ae", "ldm"):
        t0 = time.monotonic()
        ref = _train(job, _clean_data(job), root / f"ckpt-{job}-ref", steps=6)
        ok = 0
        damages = ("truncate", "flip_byte", "no_commit_record", "every_checkpoint")
        for how in damages:
            d = root / f"ckpt-{job}-{how}"
            _train(job, _clean_data(job), d, steps=6, stop_at=4)
            _damage(d, how)
            warnings: list[str] = []
            handler = logging.Handler()
            handler.emit = lambda r: warnings.append(r.getMessage())  # type: ignore[method-assign]
            logging.getLogger("ldm_core.checkpoint").addHandler(handler)
            try:
                res = _train(job, _clean_data(job), d, steps=6)
            finally:
                logging.getLogger("ldm_core.checkpoint").removeHandler(handler)
            expected_from = None if how == "every_checkpoint" else 3
            good = res.resumed_from == expected_from and _same_weights(res, ref) and any("falling back" in w for w in warnings)
            ok += good
            details.append({"job": job, "damage": how, "resumed_from": res.resumed_from, "ok": good})
            log(f"  {job} {how}: resumed_from {res.resumed_from}, equal {_same_weights(res, ref)}")
        rows.append(_row("corrupt checkpoint", f"{JOB_NAMES[job]}: {', '.join(damages)}", len(damages), len(damages),
                         ok, f"{ok}/{len(damages)} fell back with a warning, bitwise equal", time.monotonic() - t0,
                         "resumed from step 3 (previous good); every-checkpoint-corrupt starts over"))
    return rows, details


# ---------------------------------------------------------------------------------------------------------------
# 5. Storage faults
# ---------------------------------------------------------------------------------------------------------------

def storage_faults(root: Path, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    from benchmarks.latent_loader import moto_server
    from ldm_core import storage
    from ldm_core.checkpoint import CheckpointManager
    from ldm_core.data import IngestConfig, ingest, write_shapes_source
    from ldm_core.data.latent_store import LatentStoreConfig, encode_dataset
    from ldm_core.text_encoder import TextEncoder, TextEncoderConfig
    from tests.faults.s3proxy import FAULTS, FaultPolicy, FaultProxy

    rows, details = [], []
    src = root / "storage" / "src"
    write_shapes_source(str(src), 24, seed=0)
    grown = root / "storage" / "grown"
    write_shapes_source(str(grown), 32, seed=0)

    def ing(source, url):
        return ingest(IngestConfig(source=str(source), rows_per_shard=8, val_fraction=0.25), url)

    vae, text = runner.encode_vae(), TextEncoder(TextEncoderConfig(max_length=8))
    store_cfg = LatentStoreConfig(resolution=32, batch_size=8, dtype="fp32")
    ref_ds, ref_store = str(root / "storage" / "ref-ds"), str(root / "storage" / "ref-store")
    ing(src, ref_ds)
    encode_dataset(ref_ds, ref_store, vae, text, store_cfg, vae_identity=runner.VAE_IDENTITY)
    ref_ae = _train("ae", runner.ae_data(), root / "storage" / "ref-ckpt", steps=3)

    with moto_server() as bucket:
        upstream = os.environ["AWS_ENDPOINT_URL"]
        with FaultProxy(upstream) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            try:
                # transient faults, one kind at a time, then all mixed at a higher rate
                cases = [(k, FaultPolicy(every=3, faults=(k,), delay=0.5)) for k in FAULTS]
                cases.append(("mixed", FaultPolicy(every=2, delay=0.5)))
                for name, policy in cases:
                    t0 = time.monotonic()
                    proxy.set_policy(FaultPolicy())
                    before = dict(proxy.injected)
                    proxy.set_policy(policy)
                    base = f"{bucket}/transient-{name}"
                    checks = {}
                    try:
                        ing(src, f"{base}/ds")
                        checks["dataset"] = campaign.compare_dataset(ref_ds, f"{base}/ds")[0]
                        encode_dataset(f"{base}/ds", f"{base}/store", vae, text, store_cfg,
                                       vae_identity=runner.VAE_IDENTITY)
                        checks["latent store"] = campaign.compare_store(ref_store, f"{base}/store", 24)[0]
                        _train("ae", runner.ae_data(), f"{base}/ckpt", steps=3, stop_at=2)  # type: ignore[arg-type]
                        res = _train("ae", runner.ae_data(), f"{base}/ckpt", steps=3)  # type: ignore[arg-type]
                        checks["checkpoints"] = res.resumed_from == 2 and _same_weights(res, ref_ae)
                        error = ""
                    except Exception as e:  # a fault that was not survived is a result, not a crash of the script
                        error = f"{type(e).__name__}: {e}"
                    proxy.set_policy(FaultPolicy())
                    hit = sum(proxy.injected.values()) - sum(before.values())
                    survived = hit if checks and all(checks.values()) and not error else 0
                    rows.append(_row("s3 transient", f"{name} (1 in {policy.every} requests)", 1, hit, survived,
                                     "complete, equal to fault-free" if survived == hit and not error
                                     else f"FAILED {error or checks}", time.monotonic() - t0,
                                     "ingest + zarr latent store + trainer checkpoints/resume"))
                    details.append({"case": name, "faults": hit, "checks": checks, "error": error})
                    log(f"  s3 {name}: {hit} faults, {checks} {error}")

                # permanent errors: named URL, earlier writes intact, completion once healed
                os.environ["LDM_S3_MAX_ATTEMPTS"] = "2"
                for fault, error_type in (("403", PermissionError), ("nobucket", FileNotFoundError),
                                          ("reset", storage.StorageError), ("503", storage.StorageError)):
                    t0 = time.monotonic()
                    proxy.set_policy(FaultPolicy())
                    ds, ckpt = f"{bucket}/permanent-{fault}/ds", f"{bucket}/permanent-{fault}/ckpt"
                    ing(src, ds)
                    rows_before = campaign.dataset_rows(ds)
                    mgr = CheckpointManager(ckpt)
                    mgr.save(1, {"w": torch.arange(4.0)})
                    proxy.set_policy(FaultPolicy(always=fault))
                    outcome = {}
                    for what, fn, url in (("ingest", lambda: ing(grown, ds), ds),
                                          ("checkpoint", lambda: mgr.save(2, {"w": torch.zeros(4)}), ckpt)):
                        try:
                            fn()
                            outcome[what] = "no error"
                        except Exception as e:
                            outcome[what] = "named" if isinstance(e, error_type) and url in str(e) else f"{type(e).__name__}: {e}"
                    proxy.set_policy(FaultPolicy())
                    intact = campaign.dataset_rows(ds) == rows_before and mgr.load_latest()[0] == 1
                    completed = ing(grown, ds).rows_total == 32
                    good = all(v == "named" for v in outcome.values()) and intact and completed
                    rows.append(_row("s3 permanent", f"{fault} on every request", 2, 2, 2 if good else 0,
                                     f"{error_type.__name__} naming the URL, earlier writes intact, completes when healed"
                                     if good else f"FAILED {outcome} intact={intact} completed={completed}",
                                     time.monotonic() - t0, "LDM_S3_MAX_ATTEMPTS=2"))
                    details.append({"case": f"permanent {fault}", "outcome": outcome, "intact": intact,
                                    "completed": completed})
                    log(f"  s3 permanent {fault}: {outcome}, intact {intact}, completed {completed}")
            finally:
                os.environ.pop("LDM_S3_MAX_ATTEMPTS", None)
                os.environ["AWS_ENDPOINT_URL"] = upstream
    return rows, details


# ---------------------------------------------------------------------------------------------------------------
# 6. Numerical faults
# ---------------------------------------------------------------------------------------------------------------

def _expected_skips(n_items: int, micro: int, accum: int, seed: int, steps: int, bad: int) -> int:
    """Steps whose micro-batches include item ``bad``, in the trainer's own data order."""
    from ldm_core.trainers.common import DataPosition, EpochBatchSampler

    it = EpochBatchSampler(n_items, micro, seed=seed).iterate(DataPosition())
    step_batches = [[next(it)[1] for _ in range(accum)] for _ in range(steps)]  # every micro-batch drawn, in order
    return sum(any(bad in b for b in batches) for batches in step_batches)


def numerical(root: Path, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    from ldm_core.checkpoint import CheckpointManager
    from ldm_core.trainers.common import NonFiniteLossError
    from tests.faults.injectors import PoisonedAfter

    rows, details = [], []
    for job in ("ae", "ldm"):
        # isolated NaN rows: every step that draws one is skipped and counted, the rest train
        t0 = time.monotonic()
        data = _clean_data(job)
        key = "image" if job == "ae" else "latents"
        data.columns[key][5].fill_(float("nan"))
        steps = 12
        res = _train(job, data, root / f"nan-{job}", steps=steps)
        tc = (runner.ae_config if job == "ae" else runner.ldm_config)(steps).trainer
        micro = tc.micro_batch_size or tc.batch_size
        expected = _expected_skips(len(data), micro, tc.batch_size // micro, tc.seed, steps, bad=5)
        finite = all(torch.isfinite(v).all() for v in res.model.state_dict().values())
        good = res.nonfinite_skipped == expected and finite
        rows.append(_row("numerical", f"{JOB_NAMES[job]}: one NaN row in the data", 1, expected, expected if good else 0,
                         f"{res.nonfinite_skipped} steps skipped and counted (expected {expected}), weights finite",
                         time.monotonic() - t0))
        details.append({"job": job, "case": "isolated", "skipped": res.nonfinite_skipped, "expected": expected})

        # data that turns NaN for good: stop, last good checkpoint intact, resumable
        t0 = time.monotonic()
        d = root / f"nan-forever-{job}"
        try:
            _train(job, PoisonedAfter(_clean_data(job), good_batches=8), d, steps=10, max_nonfinite=1)
            stopped = False
        except NonFiniteLossError:
            stopped = True
        mgr = CheckpointManager(str(d))
        step, last = mgr.load_latest()
        intact = step == 5 and all(torch.equal(v, mgr.load(4)["model"][k]) for k, v in last["model"].items())
        resumed = _train(job, _clean_data(job), d, steps=7, max_nonfinite=1)
        good = stopped and intact and resumed.resumed_from == 5
        rows.append(_row("numerical", f"{JOB_NAMES[job]}: data NaN for good", 1, 2, 2 if good else 0,
                         "stopped; last checkpoint verifies, unchanged by the skipped step; resumes"
                         if good else f"FAILED stopped={stopped} intact={intact}", time.monotonic() - t0))
        details.append({"job": job, "case": "persistent", "stopped": stopped, "intact": intact})
        log(f"  {job}: isolated {res.nonfinite_skipped}/{expected}, persistent stopped={stopped} intact={intact}")
    return rows, details


# ---------------------------------------------------------------------------------------------------------------
# 7. Bad configs
# ---------------------------------------------------------------------------------------------------------------

def configs(root: Path, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    import yaml

    from pipeline.config_bridge import ConfigValidationError
    from pipeline.validation import validate_run_config
    from tests.faults.bad_configs import BAD, set_path
    from tests.faults.dagster_trial import TINY, fresh_home, home_env

    t0 = time.monotonic()
    tiny = yaml.safe_load(TINY.read_text())
    validate_run_config(tiny)
    caught, details = 0, []
    for where, value, field in BAD:
        try:
            validate_run_config(set_path(copy.deepcopy(tiny), where, value))
            outcome = "accepted"
        except ConfigValidationError as e:
            outcome = "named" if field in str(e) else f"not named: {e}"
        caught += outcome == "named"
        details.append({"field": where, "value": repr(value), "outcome": outcome})
    rows = [_row("bad config", "validate_run_config (one bad field each)", len(BAD), len(BAD), caught,
                 f"{caught}/{len(BAD)} refused naming the field", time.monotonic() - t0)]

    # the entry points: `ldm demo` and `dagster job execute`, each with a config only ldm_core can refuse
    t0 = time.monotonic()
    bin_dir = Path(sys.executable).parent
    bad = root / "bad.yaml"
    bad.write_text(yaml.safe_dump(set_path(copy.deepcopy(tiny), "ops.ldm_model.config.training.trainer.checkpoint_every", 0)))
    home = root / "bad-home"
    demo = subprocess.run([str(bin_dir / "ldm"), "demo", "--config", str(bad)], cwd=campaign.ROOT, env=home_env(home),
                          capture_output=True, text=True, timeout=300)
    demo_ok = demo.returncode == 2 and "checkpoint_every" in demo.stderr and not home.exists()
    home = fresh_home(root / "bad-home-dagster")
    run = subprocess.run([str(bin_dir / "dagster"), "job", "execute", "-m", "pipeline.definitions", "-j",
                          "ldm_training_job", "-c", str(bad)], cwd=campaign.ROOT, env=home_env(home),
                         capture_output=True, text=True, timeout=300)
    text = run.stdout + run.stderr
    dagster_ok = run.returncode != 0 and "checkpoint_every" in text and "STEP_START" not in text \
        and not (home / "storage").exists()
    n = demo_ok + dagster_ok
    rows.append(_row("bad config", "ldm demo / dagster job execute", 2, 2, n,
                     f"{n}/2 refused before any asset ran, field named", time.monotonic() - t0))
    details.append({"ldm_demo": demo_ok, "dagster_job_execute": dagster_ok})
    log(f"  configs: {caught}/{len(BAD)} named; ldm demo {demo_ok}, dagster {dagster_ok}")
    return rows, details


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def run(trials: int, seed: int, workdir: Path, only: tuple[str, ...], dagster_trials: int,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.set_num_threads(1)
    rng = random.Random(seed)
    result: dict[str, Any] = {"machine": machine_info(), "seed": seed, "trials_per_job": trials, "sections": {}}
    rows: list[Row] = []
    t0 = time.monotonic()
    steps: dict[str, Callable[[], tuple[list[Row], Any]]] = {
        "kills": lambda: kills(workdir / "kills", trials, rng, log),
        "dagster": lambda: dagster(workdir / "dagster", dagster_trials, rng, log),
        "atomic": lambda: atomic(workdir, max(10, 2 * trials), rng, log),
        "checkpoints": lambda: checkpoints(workdir / "checkpoints", log),
        "storage": lambda: storage_faults(workdir, log),
        "numerical": lambda: numerical(workdir / "numerical", log),
        "configs": lambda: configs(workdir, log),
    }
    for name in SECTIONS:
        if name not in only:
            continue
        log(f"[{name}]")
        s = time.monotonic()
        section_rows, details = steps[name]()
        rows += section_rows
        result["sections"][name] = {"rows": section_rows, "details": details, "seconds": time.monotonic() - s}
    result["rows"] = rows
    result["totals"] = {"rows": len(rows), "trials": sum(r["trials"] for r in rows),
                        "faults": sum(r["faults"] for r in rows), "survived": sum(r["survived"] for r in rows),
                        "all_survived": all(r["faults"] == r["survived"] for r in rows)}
    result["seconds"] = time.monotonic() - t0
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10, help="kill trials per job (default 10)")
    p.add_argument("--dagster-trials", type=int, default=1, help="killed dagster job executions (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 kill trials per job (a smoke run)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    p.add_argument("--json", default="benchmarks/results/faults.json")
    p.add_argument("--workdir", default=None, help="keep the campaign's files here (default: a temp dir, removed)")
    a = p.parse_args(argv)
    only = tuple(s.strip() for s in a.only.split(",") if s.strip())
    unknown = set(only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    trials = 2 if a.quick else a.trials
    tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="ldm-faults-")
    workdir = Path(a.workdir or tmp.name)  # type: ignore[union-attr]
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run(trials, a.seed, workdir, only, a.dagster_trials)
    finally:
        if tmp is not None:
            tmp.cleanup()
    m, t = result["machine"], result["totals"]
    print(f"\nfault campaign: seed {a.seed}, {trials} kill trials per job | {m['cpu']} | torch {m['torch']} | "
          f"{result['seconds'] / 60:.1f} min")
    print_table(result["rows"], ["category", "case", "trials", "faults", "survived", "result", "seconds", "notes"])
    print(f"\ntotal: {t['trials']} trials, {t['faults']} faults injected, {t['survived']} survived"
          f"{'' if t['all_survived'] else '  <-- NOT ALL SURVIVED'}")
    write_json(result, a.json)
    return result


if __name__ == "__main__":
    main()
