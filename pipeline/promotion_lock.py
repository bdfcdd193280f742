"""A lock that one process at a time holds across every process sharing the storage root: the promotion gate's.

MLflow's registry has no compare-and-swap for an alias, so the gate re-reads the champion, decides and moves the
alias while holding this lock (`pipeline.promotion`). The critical section is a few registry calls (seconds), never an
evaluation.

Two mechanisms, one per kind of storage root, each the one that storage makes atomic:

- a local root (one machine: the laptop, `dagster dev`, one node): ``fcntl.flock`` on ``<root>/locks/<name>.lock``.
  The kernel releases it when its holder exits, however it exits, so a killed step never leaves a stale lock and
  there is no expiry to tune. (flock also works on NFS v4 on Linux, where it becomes a POSIX lock.)
- an S3 root (the deployment: run pods on several nodes): a lease object ``<root>/locks/<name>.json`` created with
  ``PutObject If-None-Match: *`` (exactly one creator wins). A crashed holder cannot release it, so it carries an
  expiry; a waiter that finds it expired takes it over with ``PutObject If-Match: <its ETag>`` (exactly one waiter
  wins), and the holder releases only its own lease (``DeleteObject If-Match``). The holder checks it still holds the
  lease (by its own clock, with a margin) right before the write it protects. This needs an S3 service with
  conditional writes (AWS S3 since 2024; moto; recent MinIO).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from ldm_core import storage

LEASE_SECONDS = 300.0
"""How long an S3 lease lasts without its holder: far above the critical section, so that only a dead holder's
lease ever expires."""
SAFETY_MARGIN_SECONDS = 30.0
"""A holder acts only while its lease has this much time left: room for clock skew between nodes and a slow call."""
WAIT_SECONDS = 600.0
"""How long `acquire` waits for another holder before giving up (a retryable step failure)."""
POLL_SECONDS = 0.2


class LockTimeout(TimeoutError):
    """Another process held the lock for longer than the wait; the message names it."""


class LockLost(RuntimeError):
    """The holder's lease ran out before it was done: it must not do the write the lock protects."""


class LocalLock:
    """``fcntl.flock`` on a file under a local root (see the module's docstring)."""

    def __init__(self, path: str, *, wait: float = WAIT_SECONDS, poll: float = POLL_SECONDS):
        self.path, self.wait, self.poll = path, wait, poll
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    holder = _read_holder(self.path)
                    raise LockTimeout(f"{self.path}: held by {holder} for over {self.wait:.0f}s") from None
                time.sleep(self.poll)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder()).encode())  # who holds it, for the timeout message; the lock is the flock
        self._fd = fd

    def check_held(self) -> None:
        """A flock lasts as long as its holder: nothing can take it away."""
        if self._fd is None:
            raise LockLost(f"{self.path}: not held")

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor releases the flock


class S3Lease:
    """A lease object on S3 written with conditional PUTs (see the module's docstring), through the conditional
    writes of `ldm_core.storage` (`write_if_version`, `read_versioned`, `delete_if_version`)."""

    def __init__(
        self,
        url: str,
        *,
        lease: float = LEASE_SECONDS,
        margin: float = SAFETY_MARGIN_SECONDS,
        wait: float = WAIT_SECONDS,
        poll: float = POLL_SECONDS,
        clock: Callable[[], float] = time.time,
    ):
        self.url = url
        self.lease, self.margin, self.wait, self.poll, self.clock = lease, margin, wait, poll, clock
        self._etag: str | None = None
        self._expires_at = 0.0

    def _put(self, expected: str | None) -> bool:
        """One conditional PUT of a fresh lease (``expected`` None: only if there is none); False when the
        condition did not hold (another process won)."""
        expires_at = self.clock() + self.lease
        body = json.dumps({**_holder(), "expires_at": expires_at}).encode()
        try:
            etag = storage.write_if_version(self.url, body, expected)
        except FileNotFoundError:
            if expected is not None:
                return False  # released between our read and our takeover: try creating it again
            raise
        if etag is None:
            return False
        self._etag, self._expires_at = etag, expires_at
        return True

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        holder: dict[str, Any] = {}
        while True:
            if self._put(None):
                return
            current = storage.read_versioned(self.url)  # one GET: the lease and its ETag belong together
            if current is not None:
                holder, etag = json.loads(current[0]), current[1]
                if float(holder.get("expires_at", 0.0)) < self.clock() and self._put(etag):
                    return  # its holder died without releasing it: taken over
            if time.monotonic() >= deadline:
                raise LockTimeout(f"{self.url}: held by {holder or 'another process'} for over {self.wait:.0f}s")
            time.sleep(self.poll)

    def check_held(self) -> None:
        if self._etag is None or self.clock() > self._expires_at - self.margin:
            raise LockLost(f"{self.url}: the lease ran out before the promotion was done; it is not safe to go on")

    def release(self) -> None:
        if self._etag is None:
            return
        etag, self._etag = self._etag, None
        with contextlib.suppress(OSError):
            # only our own lease: after an expiry it may be another holder's, which must stay
            storage.delete_if_version(self.url, etag)


Lock = LocalLock | S3Lease


def storage_lock(root: str, name: str, **kwargs: Any) -> Lock:
    """The lock called ``name`` under a storage root: a flock for a local root, an S3 lease for ``s3://``."""
    protocol = storage.protocol_of(root)
    if protocol == "file":
        return LocalLock(os.path.join(storage.local_path(root), "locks", f"{name}.lock"), **kwargs)
    if protocol in ("s3", "s3a"):
        return S3Lease(storage.join(root, "locks", f"{name}.json"), **kwargs)
    raise ValueError(f"no cross-process lock for {protocol}:// storage roots (local paths and s3:// have one)")


@contextlib.contextmanager
def held(lock: Lock) -> Iterator[Lock]:
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}


def _read_holder(path: str) -> str:
    try:
        with open(path) as f:
            return f.read() or "another process"
    except OSError:
        return "another process"


__all__ = ["LEASE_SECONDS", "LocalLock", "Lock", "LockLost", "LockTimeout", "S3Lease", "held", "storage_lock"]
