"""Training checkpoints: one safetensors file per step, written atomically, verified by checksum on load.

A checkpoint holds arbitrary nested state (model and optimizer state dicts, RNG states, step, data position):
tensors go into the safetensors body, everything else into a JSON skeleton in its metadata, so nothing is
pickled and loading never executes code. After the body lands, a ``.sha256`` sidecar is written; a checkpoint
without a matching sidecar is incomplete or corrupt, and loading falls back to the previous good one with a
warning.

One writer per directory: saving holds the directory's writer lease (`ldm_core.leases`), a trainer for its whole
run (`CheckpointManager.acquire`), a lone `save` for its own duration. Files are created exclusively, never
replaced by a peer; a writer deletes (prunes, cleans temp files) only what it found when it took the lease or
created itself, and checks on storage that it still holds the lease before each write and each prune, so a zombie
trainer (paused past its lease) stops instead of pruning or overwriting the live one's checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ldm_core import storage
from ldm_core.leases import LeaseLostError, WriterLease, pause_before_commit

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{9})\.safetensors$")
_SKELETON_KEY = "ldm_checkpoint_state"


# ---------------------------------------------------------------------------------------------------------------
# Nested state <-> (tensors, JSON skeleton)
# ---------------------------------------------------------------------------------------------------------------


def skeleton_of(state: Any, on_tensor: Callable[[torch.Tensor, str], None]) -> Any:
    """The JSON-able skeleton of a nested state, every tensor replaced by a reference to its path (each handed to
    ``on_tensor(tensor, path)``); `unflatten_state` reverses it."""

    def visit(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            on_tensor(obj, path)
            return {"__tensor__": path}
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj):
                return {"__dict__": {k: visit(v, f"{path}/{k}") for k, v in obj.items()}}
            return {"__items__": [[k, visit(v, f"{path}/{k}")] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {"__tuple__": [visit(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [visit(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {path or '/'}")

    return visit(state, "")


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Replace every tensor in a nested structure by a reference; return (tensors on CPU, JSON-able skeleton)."""
    tensors: dict[str, torch.Tensor] = {}
    seen_ptrs: set[tuple[int, int]] = set()

    def on_tensor(obj: torch.Tensor, path: str) -> None:
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        # safetensors refuses tensors sharing memory; copy the (rare) aliased ones
        if key is not None and key in seen_ptrs or not t.is_contiguous():
            t = t.clone().contiguous()
        elif key is not None:
            seen_ptrs.add(key)
        tensors[path] = t

    skeleton = skeleton_of(state, on_tensor)
    return tensors, skeleton


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    def visit(obj: Any) -> Any:
        if isinstance(obj, dict):
            if "__tensor__" in obj:
                return tensors[obj["__tensor__"]]
            if "__dict__" in obj:
                return {k: visit(v) for k, v in obj["__dict__"].items()}
            if "__items__" in obj:
                return {k: visit(v) for k, v in obj["__items__"]}
            if "__tuple__" in obj:
                return tuple(visit(v) for v in obj["__tuple__"])
            raise ValueError(f"unknown checkpoint node {sorted(obj)}")
        if isinstance(obj, list):
            return [visit(v) for v in obj]
        return obj

    return visit(skeleton)


def state_to_bytes(state: Any) -> bytes:
    tensors, skeleton = flatten_state(state)
    return st_save(tensors, metadata={_SKELETON_KEY: json.dumps(skeleton)})


def state_from_bytes(data: bytes) -> Any:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta = header.get("__metadata__", {})
    if _SKELETON_KEY not in meta:
        raise ValueError("not an ldm checkpoint (no state skeleton in the safetensors metadata)")
    tensors = st_load(data)
    return unflatten_state(tensors, json.loads(meta[_SKELETON_KEY]))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint directory
# ---------------------------------------------------------------------------------------------------------------


class CorruptCheckpointError(RuntimeError):
    pass


class CheckpointManager:
    """Keeps the last ``keep`` checkpoints of one training run under a directory URL (local or s3://)."""

    def __init__(self, directory: str, keep: int = 2, storage_options: dict[str, Any] | None = None):
        self.directory = str(directory)
        self.keep = max(1, keep)
        self.storage_options = storage_options
        self.lease: WriterLease | None = None
        self._found: set[str] = set()
        """Names in the directory when the lease was taken: left by earlier writers, this one may prune them."""
        self._created: dict[str, str] = {}
        """URL -> version of every file this writer created (it prunes them only if still unchanged)."""

    def _url(self, name: str) -> str:
        return storage.join(self.directory, name)

    def steps(self) -> list[int]:
        """Steps that have a body file (complete or not), ascending."""
        out = []
        for name in storage.list_dir(self.directory, self.storage_options):
            m = _NAME.match(name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    # -- the writer lease ---------------------------------------------------------------------------------------

    def acquire(self, run_id: str | None = None, lease: WriterLease | None = None) -> WriterLease:
        """Take the directory's writer lease until `release` (waiting for a live peer, see `WriterLease`; ``lease``:
        one made by the caller, e.g. with its own ttl), then delete what killed writers left: their partial temp
        files. A trainer holds it for its whole run."""
        if self.lease is None:
            lease = (lease or WriterLease(self.directory, self.storage_options, run_id=run_id)).acquire()
            self.lease, self._created = lease, {}
            # a save killed mid-write left a partial temp file (as large as a checkpoint): ours to delete now
            storage.remove_stale_temp_files(self.directory, self.storage_options)
            self._found = set(storage.list_dir(self.directory, self.storage_options))
        return self.lease

    def release(self) -> None:
        if self.lease is not None:
            lease, self.lease = self.lease, None
            lease.release()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[WriterLease]:
        if self.lease is not None:
            yield self.lease
            return
        try:
            yield self.acquire()
        finally:
            self.release()

    # -- saving -------------------------------------------------------------------------------------------------

    def save(self, step: int, state: Any) -> str:
        data = state_to_bytes(state)
        name = f"step-{step:09d}.safetensors"
        url = self._url(name)
        with self._writing():
            sidecar = self._url(f"step-{step:09d}.sha256")
            self._create(url, data, also_remove=sidecar)
            pause_before_commit()
            # the sidecar is the commit record: it lands only after the body is whole
            self._create(sidecar, hashlib.sha256(data).hexdigest().encode())
            self._prune()
        return url

    def _create(self, url: str, data: bytes, also_remove: str | None = None) -> None:
        """Create ``url`` exclusively. A file already there is not this run's (it never saves a step twice): one
        left by a killed run, or by a zombie peer; the holder, once sure it still holds the lease, replaces it
        (its commit record ``also_remove`` first)."""
        for _ in range(3):
            assert self.lease is not None
            self.lease.assert_held()
            version = storage.write_if_absent(url, data, self.storage_options)
            if version is not None:
                self._created[url] = version
                return
            log.warning("replacing %s, left by an earlier writer of %s", url, self.directory)
            for stale in (also_remove, url):
                if stale is not None:
                    storage.remove(stale, self.storage_options)
        raise LeaseLostError(f"{url} keeps reappearing: another writer is saving into {self.directory}")

    def _prune(self) -> None:
        assert self.lease is not None
        self.lease.assert_held()
        for s in self.steps()[: -self.keep]:
            # remove the commit record first, so a kill in between leaves an ignorable body, never a bad record
            for name in (f"step-{s:09d}.sha256", f"step-{s:09d}.safetensors"):
                url = self._url(name)
                if url in self._created:  # ours: only if no one replaced it since
                    storage.delete_if_version(url, self._created.pop(url), self.storage_options)
                elif name in self._found:  # there before we took the lease
                    storage.remove(url, self.storage_options)
                    self._found.discard(name)
                # else another writer's, made after we took the lease: not ours to delete

    def load(self, step: int) -> Any:
        body_url = self._url(f"step-{step:09d}.safetensors")
        sha_url = self._url(f"step-{step:09d}.sha256")
        try:
            expected = storage.read_text(sha_url, self.storage_options).strip()
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"{body_url}: no checksum record (the write did not finish)") from e
        data = storage.read_bytes(body_url, self.storage_options)
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise CorruptCheckpointError(
                f"{body_url}: checksum mismatch (expected {expected[:12]}…, got {actual[:12]}…)"
            )
        try:
            return state_from_bytes(data)
        except Exception as e:  # a body that hashes right but does not parse is corrupt too
            raise CorruptCheckpointError(f"{body_url}: unreadable ({e})") from e

    def load_latest(self) -> tuple[int, Any] | None:
        """The newest checkpoint that verifies, or None. Bad ones are skipped with a warning."""
        for step in reversed(self.steps()):
            try:
                return step, self.load(step)
            except CorruptCheckpointError as e:
                log.warning("skipping checkpoint: %s; falling back to the previous one", e)
        return None
