"""Section "writers" of the fault campaign: two runs writing one dataset and one latent store at once, and a zombie
writer (SIGSTOPped past its lease while a second run takes over, then resumed). Survived: both concurrent runs
succeed, the zombie's commit is refused, and afterwards every recorded row exists exactly once and the manifest
and the store's metadata name only shards that exist (`problems`).

The jobs run as subprocesses of this module (``python -m benchmarks.faults.writers ingest SRC OUT`` /
``encode DS STORE``), with a short writer lease and a pause injected between writing data and committing it
(``LDM_TEST_PAUSE_BEFORE_COMMIT``), so that the other writer acts inside that window.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.faults.table import Row, row
from ldm_core import storage
from ldm_core.data import canonical
from ldm_core.leases import LEASE_NAME, PAUSE_ENV, PAUSE_MARKER_ENV, TTL_ENV, WAIT_ENV

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES, ROWS_PER_SHARD = 8, 2


def _ingest_config(src: str) -> Any:
    from ldm_core.data.ingest import IngestConfig

    return IngestConfig(source=src, rows_per_shard=ROWS_PER_SHARD, val_fraction=0.25)


def _job(kind: str, a: str, b: str) -> None:
    """One writer: ``ingest SRC OUT`` or ``encode DS STORE`` (a tiny autoencoder, seeded: every job's is equal)."""
    import torch

    torch.set_num_threads(1)
    if kind == "ingest":
        from ldm_core.data.ingest import ingest

        result = ingest(_ingest_config(a), b)
        print(json.dumps({"rows_new": result.rows_new}), flush=True)
        return
    from ldm_core.data.latent_store import LatentStoreConfig, encode_dataset
    from ldm_core.models.autoencoder import AutoencoderKL, autoencoder_preset
    from ldm_core.text_encoder import TextEncoder, TextEncoderConfig

    torch.manual_seed(0)
    vae = AutoencoderKL(autoencoder_preset("tiny")).eval()
    text = TextEncoder(TextEncoderConfig(max_length=8))
    result = encode_dataset(a, b, vae, text, LatentStoreConfig(resolution=32, batch_size=8), vae_identity="bench:tiny")
    print(json.dumps({"rows_new": result.rows_new}), flush=True)


def spawn(
    kind: str, a: str, b: str, *, ttl: float, pause: float, wait: float = 120.0, marker: str | None = None
) -> subprocess.Popen:
    """A writer job; ``marker``: a local file it creates when it first pauses at a commit point."""
    env = {
        **os.environ,
        TTL_ENV: str(ttl),
        WAIT_ENV: str(wait),
        PAUSE_ENV: str(pause),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    if marker:
        env[PAUSE_MARKER_ENV] = marker
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.faults.writers", kind, a, b],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 120.0) -> tuple[int, str]:
    """(exit code, stderr's tail) of a job."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# What must hold afterwards
# ---------------------------------------------------------------------------------------------------------------


def make_source(root: str, seeds: tuple[int, ...] = (0,)) -> tuple[list[str], set[str]]:
    """A shapes source per seed under ``root``, and the image hashes that one uncontended ingestion of them all, one
    after the other, records."""
    from ldm_core.data.ingest import ingest
    from ldm_core.data.synthetic import write_shapes_source

    ref = storage.join(root, "reference")
    sources = []
    for seed in seeds:
        src = storage.join(root, f"src-{seed}")
        write_shapes_source(src, N_IMAGES, seed=seed)
        ingest(_ingest_config(src), ref)
        sources.append(src)
    return sources, _recorded_hashes(ref, [])


def _recorded_hashes(ds: str, problems: list[str]) -> set[str]:
    manifest = canonical.read_manifest(ds)
    if manifest is None:
        problems.append(f"{ds}: no manifest")
        return set()
    hashes: list[str] = []
    for name in manifest.shard_names():
        if not storage.exists(storage.join(ds, name)):
            problems.append(f"the manifest names {name}, which does not exist")
            continue
        hashes += canonical.read_shard(ds, name, columns=["sha256"]).column("sha256").to_pylist()
    if len(hashes) != len(set(hashes)):
        problems.append(f"{len(hashes) - len(set(hashes))} recorded rows appear twice")
    if len(hashes) != manifest.counts.rows:
        problems.append(f"the manifest counts {manifest.counts.rows} rows, its shards hold {len(hashes)}")
    return set(hashes)


def dataset_problems(ds: str, expected: set[str]) -> list[str]:
    problems: list[str] = []
    got = _recorded_hashes(ds, problems)
    if got != expected:
        problems.append(f"{len(expected - got)} source rows missing, {len(got - expected)} unexpected")
    return problems


def store_problems(store: str, ds: str) -> list[str]:
    from ldm_core.data.latent_store import read_metadata
    from ldm_core.data.latent_store.reader import LatentStore

    problems: list[str] = []
    meta = read_metadata(store)
    if meta is None:
        return [f"{store}: no metadata"]
    reader = LatentStore(store)
    for s in meta.shards:
        if s.name and not storage.exists(storage.join(store, "shards", s.name)):
            problems.append(f"the store names {s.name}, which does not exist")
    if problems:
        return problems
    ids = [r["id"] for k in range(len(meta.shards)) for r in reader.read_rows(k)]
    manifest = canonical.read_manifest(ds)
    want = {
        canonical.row_id(h)
        for name in (manifest.shard_names() if manifest else [])
        for h in canonical.read_shard(ds, name, columns=["sha256"]).column("sha256").to_pylist()
    }
    if len(ids) != len(set(ids)):
        problems.append(f"{len(ids) - len(set(ids))} rows encoded twice")
    if set(ids) != want or meta.rows != len(ids):
        problems.append(f"the store holds {len(set(ids))} of the dataset's {len(want)} rows (metadata: {meta.rows})")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------------------------


def two_writers(root: str, pause: float = 2.0) -> dict[str, Any]:
    """Two ingestions of two sources into one dataset, then two encodings of it into one store; the second writer
    of each starts while the first is inside a commit window (its data written, not yet recorded)."""
    (src_a, src_b), expected = make_source(root, seeds=(0, 1))
    ds, store = storage.join(root, "ds"), storage.join(root, "store")
    out: dict[str, Any] = {"problems": []}
    for kind, a1, a2, b in (("ingest", src_a, src_b, ds), ("encode", ds, ds, store)):
        marker = Path(tempfile.mkdtemp(prefix="ldm-writers-")) / "paused"
        first = spawn(kind, a1, b, ttl=5.0, pause=pause, marker=str(marker))
        try:
            _poll(marker.exists, 90, f"the first {kind} writer is in its commit window")
        finally:
            second = spawn(kind, a2, b, ttl=5.0, pause=pause)
        for i, (rc, err) in enumerate(finish(p) for p in (first, second)):
            if rc != 0:
                out["problems"].append(f"{kind} writer {i} failed (exit {rc}): {err.strip().splitlines()[-1:]}")
        shutil.rmtree(marker.parent, ignore_errors=True)
    out["problems"] += dataset_problems(ds, expected) + store_problems(store, ds)
    return out


def _unrecorded(kind: str, url: str) -> bool:
    """Whether a writer has written data that its manifest does not name yet (it is inside its commit window)."""
    if kind == "ingest":
        manifest = canonical.read_manifest(url)
        recorded = set(manifest.shard_names()) if manifest else set()
        return any(canonical.shard_index(n) is not None and n not in recorded for n in storage.list_dir(url))
    from ldm_core.data.latent_store import read_metadata

    meta = read_metadata(url)
    recorded = {s.name for s in meta.shards} if meta else set()
    return any(n not in recorded for n in storage.list_dir(storage.join(url, "shards")))


def _poll(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting until {what}")
        time.sleep(0.05)


def _lease_token(url: str) -> int:
    got = storage.read_versioned(storage.join(url, LEASE_NAME))
    return json.loads(got[0])["token"] if got else 0


def zombie(root: str, kind: str, ttl: float = 1.0) -> dict[str, Any]:
    """Writer A is SIGSTOPped between writing data and committing it, past its lease; writer B takes the directory
    over; A resumes inside B's own commit window. A's commit must be refused, B must succeed, nothing B recorded
    may be lost."""
    (src,), expected = make_source(root)
    ds, store = storage.join(root, "ds"), storage.join(root, "store")
    if kind == "ingest":
        a, b, target = src, ds, ds
    else:
        from ldm_core.data.ingest import ingest

        ingest(_ingest_config(src), ds)
        a, b, target = ds, store, store
    out: dict[str, Any] = {"problems": []}
    marker = Path(tempfile.mkdtemp(prefix="ldm-zombie-")) / "paused"
    zombie_proc = spawn(kind, a, b, ttl=ttl, pause=4 * ttl, marker=str(marker))
    live = None
    try:
        _poll(marker.exists, 90, "the first writer is in its commit window")
        if not _unrecorded(kind, target):
            raise AssertionError("the first writer paused at its commit point without unrecorded data")
        zombie_proc.send_signal(signal.SIGSTOP)
        token = _lease_token(target)
        live = spawn(kind, a, b, ttl=ttl, pause=ttl)
        _poll(lambda: _lease_token(target) > token, 90, "the second writer took the lease over")
        time.sleep(ttl)  # the live writer works (its own data written, not yet recorded)
    finally:
        zombie_proc.send_signal(signal.SIGCONT)
    rc_zombie, err_zombie = finish(zombie_proc)
    rc_live, err_live = finish(live)
    shutil.rmtree(marker.parent, ignore_errors=True)
    out["zombie_refused"] = rc_zombie != 0 and "LeaseLostError" in err_zombie
    if not out["zombie_refused"]:
        last = err_zombie.strip().splitlines()[-1:]
        out["problems"].append(f"the zombie writer was not refused (exit {rc_zombie}): {last}")
    if rc_live != 0:
        out["problems"].append(f"the live writer failed (exit {rc_live}): {err_live.strip().splitlines()[-1:]}")
    out["problems"] += dataset_problems(ds, expected)
    if kind == "encode":
        out["problems"] += store_problems(store, ds)
    return out


def writers(workdir: Path, trials: int, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    """The section: each case ``trials`` times on local disk."""
    rows: list[Row] = []
    details: dict[str, Any] = {}
    cases: dict[str, Callable[[str], dict[str, Any]]] = {
        "two runs ingest and encode into one dataset and store": two_writers,
        "zombie ingestion resumes after a takeover": lambda r: zombie(r, "ingest"),
        "zombie encoding resumes after a takeover": lambda r: zombie(r, "encode"),
    }
    for i, (case, fn) in enumerate(cases.items()):
        t0, survived, problems = time.monotonic(), 0, []
        for t in range(trials):
            root = workdir / f"writers-{i}-{t}"
            try:
                got = fn(str(root))["problems"]
            except Exception as e:  # a case that could not even run counts as not survived
                got = [f"{type(e).__name__}: {e}"]
            survived += not got
            problems += got
            log(f"  {case} #{t}: {'ok' if not got else got}")
        details[case] = problems
        rows.append(
            row(
                "concurrent writers",
                case,
                trials,
                trials,
                survived,
                f"{survived}/{trials} consistent",
                time.monotonic() - t0,
                problems[0] if problems else "local disk",
            )
        )
    return rows, details


if __name__ == "__main__":
    _job(*sys.argv[1:4])
