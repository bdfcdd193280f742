"""Sharded training checkpoints (``strategy: fsdp``): every rank writes its own shards, with
`torch.distributed.checkpoint` (DCP), to local disk or through fsspec to ``s3://``; a checkpoint reshards on load,
so one written by 2 processes resumes on 1 or on 4.

Layout under the checkpoint directory, per step::

    step-000000100.dcp/           DCP's files: .metadata (rank 0) and __<rank>_<i>.distcp (each rank its own shards)
    step-000000100.dcp.json       the commit record, written last by rank 0: format, step, the writers' world size,
                                  the SHA-256 and size of every file of the step, and the state's non-tensor part
                                  (step, data position, config, counters, Python's RNG) as JSON

The same guarantees as the single-file checkpoints (`ldm_core.checkpoint`):
- atomic commit: the record lands only once every rank's files are written and hashed, so a step without one (a
  save killed midway) is ignored and deleted by the next holder of the directory;
- corruption is detected: on load every file is hashed again (the ranks share the files out) and compared with the
  record; a step that fails on any rank is skipped on all, with a warning, for the previous one;
- exact resume: the tensors (weights, optimizer moments, EMA, RNG states) are restored bit for bit in place, into
  the shards each rank holds now;
- one writer per directory: rank 0 holds the directory's writer lease (`ldm_core.leases`) for the whole run, and
  checks it before each commit and each prune.

DCP's files are its own: ``.metadata`` is a pickle, and tensors are read back with ``torch.load(weights_only=True)``
(which refuses anything but tensors and plain containers); everything of ours is JSON, and every file is checked
against its SHA-256 before DCP reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ldm_core import distributed, storage
from ldm_core.checkpoint import CorruptCheckpointError, skeleton_of, unflatten_state
from ldm_core.leases import WriterLease, pause_before_commit

log = logging.getLogger(__name__)

FORMAT = "ldm-dcp/1"
_STEP = re.compile(r"^step-(\d{9})\.dcp$")
_RECORD = re.compile(r"^step-(\d{9})\.dcp\.json$")
_CHUNK = 8 << 20


def split_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Every tensor (DTensors included, left where they are) of a nested state by its path, and the JSON-able rest
    with references in their place (the skeleton `ldm_core.checkpoint.unflatten_state` reverses)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = skeleton_of(state, lambda t, path: tensors.__setitem__(path, t.detach()))
    return tensors, skeleton


def _tensor_paths(skeleton: Any) -> set[str]:
    paths: set[str] = set()

    def visit(obj: Any) -> None:
        if isinstance(obj, dict):
            if "__tensor__" in obj:
                paths.add(obj["__tensor__"])
            for v in obj.values():
                visit(v)
        elif isinstance(obj, list):
            for v in obj:
                visit(v)

    visit(skeleton)
    return paths


def _sha256(url: str, storage_options: dict[str, Any] | None) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with storage.open_url(url, "rb", storage_options) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _fs_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    opts = dict(storage_options or {})
    if storage.protocol_of(url) == "s3":
        opts = {**storage.s3_options_from_env(), **opts}
    return opts


def _writer(url: str, storage_options: dict[str, Any] | None) -> Any:
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    if storage.is_local(url):
        return FileSystemWriter(storage.local_path(url))
    return FsspecWriter(url, **_fs_options(url, storage_options))


def _reader(url: str, storage_options: dict[str, Any] | None) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    if storage.is_local(url):
        return FileSystemReader(storage.local_path(url))
    return FsspecReader(url, **_fs_options(url, storage_options))


def _gather(obj: Any) -> list[Any]:
    if not distributed.is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class ShardedCheckpointManager:
    """Keeps the last ``keep`` sharded checkpoints of one run under a directory URL (local or s3://).

    ``save`` and ``load_latest`` are collectives: every rank calls them (``collective`` tells the trainer so);
    ``acquire``/``release`` are rank 0's, as with `ldm_core.checkpoint.CheckpointManager`.
    """

    collective = True

    def __init__(self, directory: str, keep: int = 2, storage_options: dict[str, Any] | None = None):
        self.directory = str(directory)
        self.keep = max(1, keep)
        self.storage_options = storage_options
        self.lease: WriterLease | None = None

    def _url(self, name: str) -> str:
        return storage.join(self.directory, name)

    def _names(self) -> list[str]:
        return storage.list_dir(self.directory, self.storage_options)

    def steps(self) -> list[int]:
        """Steps with a commit record (complete, unless corrupted since), ascending."""
        return sorted(int(m.group(1)) for name in self._names() if (m := _RECORD.match(name)))

    # -- the writer lease (rank 0) --------------------------------------------------------------------------------

    def acquire(self, run_id: str | None = None, lease: WriterLease | None = None) -> WriterLease:
        """Take the directory's writer lease until `release`, then delete the steps killed writers left without a
        commit record."""
        if self.lease is None:
            self.lease = (lease or WriterLease(self.directory, self.storage_options, run_id=run_id)).acquire()
            committed = set(self.steps())
            for name in self._names():
                m = _STEP.match(name)
                if m and int(m.group(1)) not in committed:
                    log.warning("removing %s: a save that never committed", self._url(name))
                    storage.remove(self._url(name), self.storage_options, recursive=True)
        return self.lease

    def release(self) -> None:
        if self.lease is not None:
            lease, self.lease = self.lease, None
            lease.release()

    # -- saving (every rank) -------------------------------------------------------------------------------------

    def save(self, step: int, state: Any) -> str:
        rank = distributed.current().rank
        name = f"step-{step:09d}.dcp"
        url, record_url = self._url(name), self._url(f"{name}.json")
        tensors, skeleton = split_state(state)
        if rank == 0:
            self._hold()
            # a step this run never saved: what is there was left by a killed attempt, record first
            for stale in (record_url, url):
                storage.remove(stale, self.storage_options, recursive=True)
        distributed.barrier()
        import torch.distributed.checkpoint as dcp

        dcp.save(tensors, storage_writer=_writer(url, self.storage_options))
        distributed.barrier()
        digests = _gather(self._hash_own_files(url, rank))
        if rank == 0:
            files = {k: v for d in digests for k, v in d.items()}
            record = {
                "format": FORMAT,
                "step": step,
                "world_size": distributed.current().world_size,
                "files": files,
                "skeleton": skeleton,
            }
            pause_before_commit()
            self._hold()
            # the commit record: it lands only after every rank's files are whole
            if storage.write_if_absent(record_url, json.dumps(record).encode(), self.storage_options) is None:
                raise CorruptCheckpointError(f"{record_url} appeared while this run was saving it")
            self._prune()
        distributed.barrier()
        return url

    def _hold(self) -> None:
        if self.lease is not None:
            self.lease.assert_held()

    def _hash_own_files(self, url: str, rank: int) -> dict[str, dict[str, Any]]:
        """SHA-256 and size of the files this rank wrote (rank 0: DCP's .metadata too)."""
        out = {}
        for name in storage.list_dir(url, self.storage_options):
            if name.startswith(f"__{rank}_") or (rank == 0 and name == ".metadata"):
                digest, size = _sha256(storage.join(url, name), self.storage_options)
                out[name] = {"sha256": digest, "size": size}
        return out

    def _prune(self) -> None:
        self._hold()
        for s in self.steps()[: -self.keep]:
            name = f"step-{s:09d}.dcp"
            # the record first, so a kill in between leaves an ignorable directory, never a record without files
            storage.remove(self._url(f"{name}.json"), self.storage_options)
            storage.remove(self._url(name), self.storage_options, recursive=True)

    # -- loading (every rank) ------------------------------------------------------------------------------------

    def _record(self, step: int) -> dict[str, Any]:
        url = self._url(f"step-{step:09d}.dcp.json")
        try:
            record = json.loads(storage.read_text(url, self.storage_options))
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{url}: unreadable commit record ({e})") from e
        if record.get("format") != FORMAT:
            raise CorruptCheckpointError(f"{url}: format {record.get('format')!r}, this version reads {FORMAT}")
        return record

    def _verify(self, step: int, record: dict[str, Any]) -> str | None:
        """Why the step's files do not match its record (None when they do); the ranks share the hashing out."""
        ctx = distributed.current()
        url = self._url(f"step-{step:09d}.dcp")
        present = set(storage.list_dir(url, self.storage_options))
        problems = [f"{name} is missing" for name in sorted(record["files"]) if name not in present]
        if not problems:
            for i, (name, want) in enumerate(sorted(record["files"].items())):
                if i % ctx.world_size != ctx.rank:
                    continue
                digest, size = _sha256(storage.join(url, name), self.storage_options)
                if (digest, size) != (want["sha256"], want["size"]):
                    problems.append(f"{name}: checksum mismatch (expected {want['sha256'][:12]}…, got {digest[:12]}…)")
        found = [p for ps in _gather(problems) for p in ps]
        return f"{url}: {'; '.join(found)}" if found else None

    def load_latest(self, template: Any, check: Callable[[Any], None] | None = None) -> tuple[int, Any] | None:
        """The newest checkpoint that verifies on every rank, loaded into this run's shards: (step, state), or None.

        template: the state as this run holds it now (the same structure a save takes); its tensors are
        overwritten in place with the checkpoint's, resharded to this run's process count. check(state without
        tensors) may refuse a checkpoint (a different model config) before any tensor is read.
        """
        for step in reversed(self.steps()):
            try:
                record = self._record(step)
                problem = self._verify(step, record)
            except CorruptCheckpointError as e:
                problem = str(e)
            if problem is not None:
                log.warning("skipping checkpoint: %s; falling back to the previous one", problem)
                continue
            if check is not None:
                check(unflatten_state(defaultdict(lambda: None), record["skeleton"]))
            return step, self._load(step, record, template)
        return None

    def _load(self, step: int, record: dict[str, Any], template: Any) -> Any:
        import torch.distributed.checkpoint as dcp

        tensors, _ = split_state(template)
        saved = _tensor_paths(record["skeleton"])
        absent = sorted(p for p in tensors if p not in saved and not p.startswith("/rng/"))
        if absent:
            raise CorruptCheckpointError(
                f"{self._url(f'step-{step:09d}.dcp')} lacks {len(absent)} tensors this run has, e.g. {absent[:3]}"
            )
        wanted = {p: t for p, t in tensors.items() if p in saved}
        dcp.load(wanted, storage_reader=_reader(self._url(f"step-{step:09d}.dcp"), self.storage_options))
        filled: dict[str, Any] = defaultdict(lambda: None, wanted)
        return unflatten_state(filled, record["skeleton"])


__all__ = ["FORMAT", "ShardedCheckpointManager", "split_state"]
