"""Training checkpoints: one safetensors file per step, written atomically, verified by checksum on load.

A checkpoint holds arbitrary nested state (model and optimizer state dicts, RNG states, step, data position):
tensors go into the safetensors body, everything else into a JSON skeleton in its metadata, so nothing is
pickled and loading never executes code. After the body lands, a ``.sha256`` sidecar is written; a checkpoint
without a matching sidecar is incomplete or corrupt, and loading falls back to the previous good one with a
warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ldm_core import storage

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{9})\.safetensors$")
_SKELETON_KEY = "ldm_checkpoint_state"


# ---------------------------------------------------------------------------------------------------------------
# Nested state <-> (tensors, JSON skeleton)
# ---------------------------------------------------------------------------------------------------------------

def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Replace every tensor in a nested structure by a reference; return (tensors, JSON-able skeleton)."""
    tensors: dict[str, torch.Tensor] = {}
    seen_ptrs: set[tuple[int, int]] = set()

    def visit(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
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

    skeleton = visit(state, "")
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

    def save(self, step: int, state: Any) -> str:
        data = state_to_bytes(state)
        name = f"step-{step:09d}.safetensors"
        url = self._url(name)
        storage.write_bytes_atomic(url, data, self.storage_options)
        # the sidecar is the commit record: it lands only after the body is whole
        storage.write_text_atomic(
            self._url(f"step-{step:09d}.sha256"), hashlib.sha256(data).hexdigest(), self.storage_options
        )
        self._prune()
        return url

    def _prune(self) -> None:
        # a run killed mid-write left a partial temp file (as large as a checkpoint); the run that follows deletes it
        storage.remove_stale_temp_files(self.directory, self.storage_options)
        steps = self.steps()
        for s in steps[: -self.keep]:
            # remove the commit record first, so a kill in between leaves an ignorable body, never a bad record
            storage.remove(self._url(f"step-{s:09d}.sha256"), self.storage_options)
            storage.remove(self._url(f"step-{s:09d}.safetensors"), self.storage_options)

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
