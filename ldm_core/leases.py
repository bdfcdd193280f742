"""Writer leases: one writer at a time per directory (a dataset, a latent store, a checkpoint directory), and a
writer that lost its lease can no longer commit.

Why a lease plus fencing, and not a lock alone: the writers may be two Dagster runs on two hosts (the concurrency
limit misconfigured), sharing only the storage (a local disk or S3). A lock that the holder must release is lost
with a killed process; a lease expires by itself. But a lease cannot stop a process that was paused past its expiry
(SIGSTOP, a VM migration, a long GC) and then resumes believing it still holds it: only the storage can refuse that
zombie's writes. So every writer of a directory commits its manifest with a compare-and-swap against the version it
last read or wrote (`storage.write_if_version`), and a new holder first stamps the manifest, bumping a generation in
it (`FencedFile.fence`): the zombie's next commit finds a version it never saw and fails with `LeaseLostError`, and
nothing the live writer recorded is lost. Data files are never overwritten by another writer: they are created
exclusively (`storage.write_if_absent`) or under names unique to the writer. Cleanup (orphans, temp files) is done
by a holder right after it fenced the manifest, when nothing an earlier holder left can be recorded any more.

The lease is ``<dir>/_writer_lease.json``: owner id, fencing token, pid, host, process start time, run id, and
``expires_at`` (wall-clock seconds). It is acquired and renewed by compare-and-swap, renewed by a daemon thread
every ttl/3, and released on exit. A holder whose lease expired, or, on this host, whose process is gone, is taken
over with the token + 1; a live holder is waited for (polling, up to the wait time) and then refused with
`LeaseHeldError` naming it.

Deployment: ``LDM_WRITER_LEASE_TTL`` (seconds, default 60) must exceed any pause a healthy writer may see between
heartbeats, and clocks of the hosts sharing a storage root must agree to well within it (NTP); a skew only makes a
takeover early or late, fencing keeps it safe either way. ``LDM_WRITER_LEASE_WAIT`` (seconds, default 600) bounds
how long a second writer waits for the first. Local storage relies on ``flock`` (see `storage`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from ldm_core import storage

log = logging.getLogger(__name__)

M = TypeVar("M")

LEASE_NAME = "_writer_lease.json"
TTL_ENV, WAIT_ENV = "LDM_WRITER_LEASE_TTL", "LDM_WRITER_LEASE_WAIT"
DEFAULT_TTL, DEFAULT_WAIT = 60.0, 600.0
PAUSE_ENV = "LDM_TEST_PAUSE_BEFORE_COMMIT"
"""Test hook: seconds every writer sleeps between writing its data and committing it (`pause_before_commit`)."""
PAUSE_MARKER_ENV = "LDM_TEST_PAUSE_MARKER"
"""Test hook: a local file that `pause_before_commit` creates as it starts to sleep (a test then knows the writer
is inside its commit window)."""


class LeaseHeldError(RuntimeError):
    """Another live writer holds the directory (after waiting for it)."""


class LeaseLostError(RuntimeError):
    """This writer no longer holds the directory: another took it over (this one was paused or too slow to renew).
    Nothing it had committed is lost; what it had not committed is not recorded, and the new holder removes it."""


@dataclass(frozen=True)
class LeaseRecord:
    owner: str
    token: int
    pid: int
    host: str
    process_start: str
    run_id: str | None
    expires_at: float


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc), so a reused pid is told apart; "" elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _process_gone(record: LeaseRecord) -> bool:
    """True only when the holder ran on this host and its process no longer exists (or is another process)."""
    if record.host != socket.gethostname() or not record.process_start:
        return False
    return _process_start(record.pid) != record.process_start


def env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def pause_before_commit() -> None:
    """Test hook between writing data and committing it; does nothing unless ``LDM_TEST_PAUSE_BEFORE_COMMIT`` is set."""
    seconds = env_seconds(PAUSE_ENV, 0.0)
    if seconds > 0:
        if marker := os.environ.get(PAUSE_MARKER_ENV):
            with open(marker, "a"):
                pass
        time.sleep(seconds)


class WriterLease:
    """The lease on one directory: ``with WriterLease(url) as lease: …`` (or `acquire` / `release`).

    ttl / wait: seconds (defaults from the environment, see the module doc). run_id: recorded for the error a
    waiting writer gets. clock: wall-clock seconds (tests pass a fake).
    """

    def __init__(
        self,
        directory: str,
        storage_options: dict[str, Any] | None = None,
        *,
        ttl: float | None = None,
        wait: float | None = None,
        run_id: str | None = None,
        poll: float | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.directory, self.storage_options = str(directory), storage_options
        self.url = storage.join(self.directory, LEASE_NAME)
        self.ttl = ttl if ttl is not None else env_seconds(TTL_ENV, DEFAULT_TTL)
        self.wait = wait if wait is not None else env_seconds(WAIT_ENV, DEFAULT_WAIT)
        self.poll = poll if poll is not None else min(1.0, self.ttl / 4)
        self.run_id, self.clock = run_id, clock
        self.owner = secrets.token_hex(8)
        self.token = 0
        self._version: str | None = None
        self._expires_at = 0.0
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquire / renew / release ----------------------------------------------------------------------------

    def _record(self) -> LeaseRecord:
        pid = os.getpid()
        return LeaseRecord(
            self.owner, self.token, pid, socket.gethostname(), _process_start(pid), self.run_id, self.clock() + self.ttl
        )

    def _put(self, record: LeaseRecord, expected: str | None) -> bool:
        version = storage.write_if_version(
            self.url, json.dumps(asdict(record)).encode(), expected, self.storage_options
        )
        if version is None:
            return False
        self._version, self._expires_at = version, record.expires_at
        return True

    def _read(self) -> tuple[LeaseRecord, str] | None:
        got = storage.read_versioned(self.url, self.storage_options)
        if got is None:
            return None
        data, version = got
        try:
            return LeaseRecord(**json.loads(data)), version
        except (ValueError, TypeError):  # unreadable: treated as an expired lease of token 0
            return LeaseRecord("?", 0, 0, "?", "", None, 0.0), version

    def acquire(self) -> WriterLease:
        """Take the lease (waiting up to ``wait`` seconds for a live holder), then keep it renewed."""
        deadline = time.monotonic() + self.wait
        while True:
            current = self._read()
            if current is None:
                self.token = 1
                if self._put(self._record(), None):
                    break
                continue
            holder, version = current
            if holder.expires_at <= self.clock() or _process_gone(holder):
                self.token = holder.token + 1
                if self._put(self._record(), version):
                    log.info(
                        "took over the writer lease of %s from %s (token %d; it had %s)",
                        storage.redact_url(self.directory),
                        _describe(holder),
                        self.token,
                        "expired" if holder.expires_at <= self.clock() else "its process gone",
                    )
                    break
                continue
            if time.monotonic() >= deadline:
                raise LeaseHeldError(
                    f"{storage.redact_url(self.directory)} is being written by another writer: {_describe(holder)}, "
                    f"lease expires at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(holder.expires_at))} "
                    f"unless renewed; waited {self.wait:.0f} s. Only one run may write a directory at a time: "
                    f"let it finish (or set {WAIT_ENV} to wait longer)."
                )
            time.sleep(min(self.poll, max(0.0, deadline - time.monotonic())) or self.poll)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.owner}", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LeaseLostError:
                return
            except Exception as e:  # a storage brownout: retried at the next beat, until the lease runs out
                log.warning("could not renew the writer lease of %s: %s", storage.redact_url(self.directory), e)

    def renew(self) -> None:
        """Extend the lease by ``ttl`` (compare-and-swap on the version this holder last wrote)."""
        with self._lock:
            if self._lost:
                raise LeaseLostError(self._lost)
            record = self._record()
            if not self._put(record, self._version):
                now = self._read()
                self._lost = (
                    f"lost the writer lease of {storage.redact_url(self.directory)} (token {self.token}): "
                    f"now held by {_describe(now[0]) if now else 'nobody'}"
                )
                raise LeaseLostError(self._lost)

    def assert_held(self) -> None:
        """Raise `LeaseLostError` unless this writer still holds the lease: checked on storage, not just locally
        (a process that was paused finds out here; its commits are refused by the fence besides)."""
        with self._lock:
            if self._lost:
                raise LeaseLostError(self._lost)
            current = self._read()
            if current is not None and current[1] == self._version and self._expires_at <= self.clock():
                # expired by our clock (a late heartbeat) but nobody took it: renewing by compare-and-swap is safe
                if self._put(self._record(), self._version):
                    return
            if current is None or current[1] != self._version or self._expires_at <= self.clock():
                self._lost = (
                    f"lost the writer lease of {storage.redact_url(self.directory)} (token {self.token}, "
                    f"expired {self.clock() - self._expires_at:.0f} s ago): now held by "
                    f"{_describe(current[0]) if current else 'nobody'}"
                )
                raise LeaseLostError(self._lost)

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours (a lost one is left to its new holder)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl)
            self._thread = None
        with self._lock:
            if self._lost is None and self._version is not None:
                try:
                    storage.delete_if_version(self.url, self._version, self.storage_options)
                except OSError as e:  # it expires by itself
                    log.warning("could not release the writer lease of %s: %s", storage.redact_url(self.directory), e)
            self._version = None

    def __enter__(self) -> WriterLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(record: LeaseRecord) -> str:
    run = f"run {record.run_id}, " if record.run_id else ""
    return f"{run}pid {record.pid} on {record.host} (token {record.token})"


class FencedFile:
    """A manifest committed only by the lease holder, by compare-and-swap against the version it last read or wrote.

    `fence` stamps it when the lease is taken (the caller bumps a generation counter in the content, so the version
    always changes), so a previous holder's later commit fails even if that one never looks at the lease again."""

    def __init__(self, url: str, lease: WriterLease, storage_options: dict[str, Any] | None = None):
        self.url, self.lease, self.storage_options = url, lease, storage_options
        self.version: str | None = None

    def read(self) -> bytes | None:
        got = storage.read_versioned(self.url, self.storage_options)
        self.version = None if got is None else got[1]
        return None if got is None else got[0]

    def fence(self, load: Callable[[bytes | None], M], dump: Callable[[M], bytes]) -> M:
        """Read the manifest, let ``load`` parse it and stamp it (bump its generation), and write it back: from
        here on a previous holder's commit fails. Retried when that one commits in between (its commit was made
        under its lease and stays). Returns the stamped manifest."""
        for _ in range(20):
            self.lease.assert_held()
            manifest = load(self.read())
            version = storage.write_if_version(self.url, dump(manifest), self.version, self.storage_options)
            if version is not None:
                self.version = version
                return manifest
        raise LeaseLostError(f"could not stamp {storage.redact_url(self.url)}: it keeps changing under this writer")

    def commit(self, data: bytes) -> None:
        """Write ``data`` if nobody else wrote since this writer's last read or commit; else `LeaseLostError`."""
        version = storage.write_if_version(self.url, data, self.version, self.storage_options)
        if version is None:
            now = self.lease._read()
            raise LeaseLostError(
                f"{storage.redact_url(self.url)} was changed by another writer since this one (token "
                f"{self.lease.token}) last wrote it; the writer lease is now held by "
                f"{_describe(now[0]) if now else 'nobody'}. This writer stops; what it had committed stays."
            )
        self.version = version
