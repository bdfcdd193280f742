"""The promotion lock: one holder at a time across processes, on a local root (flock) and on S3 (a lease object with
conditional writes, on moto's real S3 endpoint); a dead holder never blocks the gate for good."""

import signal
import subprocess
import sys
import textwrap

import pytest

from pipeline.promotion_lock import LocalLock, LockLost, LockTimeout, S3Lease, held, storage_lock
from tests.common import python_env

# a second process: tries the lock for `wait` seconds; exit 0 when it got it, 3 when it timed out
TRY = textwrap.dedent("""
    import sys
    from pipeline.promotion_lock import LockTimeout, storage_lock
    lock = storage_lock(sys.argv[1], "promotion-ldm", wait=float(sys.argv[2]), poll=0.05)
    try:
        lock.acquire()
    except LockTimeout:
        sys.exit(3)
    if len(sys.argv) > 3:  # hold it until killed
        print("held", flush=True)
        sys.stdin.read()
    lock.release()
""")


def _try(root: str, wait: float = 0.5) -> int:
    return subprocess.run([sys.executable, "-c", TRY, root, str(wait)], env=python_env(), timeout=120).returncode


def test_a_local_lock_excludes_another_process_until_released(tmp_path):
    lock = storage_lock(str(tmp_path), "promotion-ldm")
    with held(lock):
        assert _try(str(tmp_path)) == 3
    assert _try(str(tmp_path)) == 0


def test_a_local_lock_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", TRY, str(tmp_path), "5", "hold"],
        env=python_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout, match="held by"):
            storage_lock(str(tmp_path), "promotion-ldm", wait=0.3, poll=0.05).acquire()
        holder.send_signal(signal.SIGKILL)  # killed mid-promotion: no release, no cleanup
        holder.wait(30)
        lock = storage_lock(str(tmp_path), "promotion-ldm", wait=5, poll=0.05)
        lock.acquire()
        lock.check_held()
        lock.release()
    finally:
        holder.kill()


def test_an_s3_lease_excludes_another_process_until_released(s3_url):
    lock = storage_lock(s3_url, "promotion-ldm")
    assert isinstance(lock, S3Lease)
    with held(lock):
        lock.check_held()
        assert _try(s3_url) == 3
    assert _try(s3_url) == 0


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_an_expired_s3_lease_is_taken_over_once_and_its_old_holder_must_stop(s3_url):
    clock = Clock()
    url = f"{s3_url}/locks/promotion-ldm.json"
    dead = S3Lease(url, lease=60, margin=10, clock=clock)
    dead.acquire()
    clock.now += 30
    with pytest.raises(LockTimeout):  # not expired yet: nobody takes it
        S3Lease(url, lease=60, margin=10, wait=0.3, poll=0.05, clock=clock).acquire()
    clock.now += 40  # its holder stalled or died: the lease ran out
    with pytest.raises(LockLost):
        dead.check_held()
    heir, rival = (S3Lease(url, lease=60, margin=10, wait=0.3, poll=0.05, clock=clock) for _ in range(2))
    heir.acquire()
    heir.check_held()
    with pytest.raises(LockTimeout):  # the takeover is the heir's alone
        rival.acquire()
    dead.release()  # the old holder comes back and releases: the heir's lease must stay
    with pytest.raises(LockTimeout):
        rival.acquire()
    heir.release()
    rival.acquire()
    rival.release()


def test_storage_roots_without_a_lock_are_refused():
    with pytest.raises(ValueError, match="gs://"):
        storage_lock("gs://bucket/prefix", "promotion-ldm")


def test_a_local_lock_released_twice_or_never_taken_is_harmless(tmp_path):
    lock = LocalLock(str(tmp_path / "locks" / "x.lock"))
    with pytest.raises(LockLost):
        lock.check_held()
    lock.release()
    with held(lock):
        lock.check_held()
    lock.release()
