"""Bit rot: a shard that changed on storage after it was written is seen when it is read, and refused.

Writers record the sha256 of every file of a shard (dataset shards in the manifest's `ShardInfo`, latent store
shards in the metadata's `StoreShard`) at write time; readers hash what they read and compare, once per shard per
process. A mismatch (a flipped byte, a truncated or replaced file, a missing Zarr chunk) raises
`CorruptShardError`, whose one-line message names the shard and its URL. Readers refuse rather than skip: a dataset
version or a latent store is the key that checkpoints, resumes and registered models are recorded under, and a run
that skipped a shard would train on other data under the same key. A shard whose manifest records no checksum is
read unchecked, and readers count such shards (``unchecked_shards``) and log it once.
"""

from __future__ import annotations

import hashlib

from ldm_core.storage import redact_url


class CorruptShardError(OSError):
    """A shard's bytes on storage are not the bytes that were written (bit rot, truncation, replacement)."""

    def __init__(self, kind: str, name: str, url: str, detail: str, remedy: str):
        self.kind, self.name, self.url = kind, name, redact_url(url)
        super().__init__(
            f"corrupt {kind} shard {name} at {self.url}: {detail}; it changed on storage after it was "
            f"written, refusing to read it ({remedy})"
        )


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def mismatch(data: bytes, sha256: str, size: int | None = None) -> str | None:
    """Why ``data`` is not the recorded file (its size, then its sha256), or None when it is."""
    if size is not None and len(data) != size:
        return f"{len(data)} bytes, {size} recorded"
    got = sha256_hex(data)
    if got != sha256:
        return f"sha256 {got[:12]}…, {sha256[:12]}… recorded"
    return None


__all__ = ["CorruptShardError", "mismatch", "sha256_hex"]
