"""Storage is always an fsspec URL: a local path, ``file://…`` or ``s3://bucket/prefix`` take one code path.

S3 endpoint and credentials come from the environment (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``) or from explicit ``storage_options``; they are never logged.

Writes are atomic: on a local filesystem a temp file in the same directory is fsynced and renamed over the
target; on S3 a single PUT is atomic by the service's semantics (readers see the old object or the new one).

Transient S3 faults (5xx, throttling, connection resets, timeouts) are retried: botocore makes up to
``LDM_S3_MAX_ATTEMPTS`` (default 10) attempts per request with capped exponential backoff, and s3fs retries
throttling, timeouts and connection errors up to 5 more times around that, so a brownout of a few minutes is ridden
out. An error that remains (or a permanent one: access denied, no such bucket) is raised naming the URL: as
FileNotFoundError / PermissionError when it is one, else as `StorageError`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import posixpath
import re
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO
from urllib.parse import unquote

import fsspec
import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem

# Options s3fs understands that we derive from the environment; nothing here is ever logged.
_S3_RETRIES = 10
_S3_RETRIES_ENV = "LDM_S3_MAX_ATTEMPTS"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()

# Temporary files of local atomic writes: ".<target name>.<random>.tmp" beside the target. A process killed between
# creating one and renaming it over the target leaves it behind; `remove_stale_temp_files` deletes them.
_TEMP_SUFFIX = ".tmp"
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


def _temp_path(directory: str, target: str) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=_TEMP_SUFFIX, dir=directory)


def s3_options_from_env() -> dict[str, Any]:
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs: dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    # botocore retries transient errors (throttling, 5xx, connection resets); raise the default attempts so a
    # flaky endpoint does not fail a run. s3fs adds its own retries on top (see the module doc).
    attempts = int(os.environ.get(_S3_RETRIES_ENV) or _S3_RETRIES)
    opts["config_kwargs"] = {"retries": {"max_attempts": max(1, attempts), "mode": "adaptive"}}
    return opts


class StorageError(OSError):
    """A storage operation that failed for good (after the retries); the message names the URL."""


# The ``user:password@`` (or ``user@``) part of a URL. A pasted secret may hold "/" (AWS secret keys do), so once a
# ":" comes before any "/", everything up to the next "@" is the password.
_USERINFO = re.compile(r"(?<=://)(?:[^/@:]*:[^@]*|[^/@:]*)@")


def redact_url(url: str) -> str:
    """The URL without any ``user:password@`` part, safe for logs, errors, params, metadata and manifests."""
    return _USERINFO.sub("", str(url), count=1)


def has_credentials(url: str) -> bool:
    """Whether ``url`` carries a ``user:password@`` (or ``user@``) part."""
    return redact_url(url) != str(url)


def _s3_inline_credentials(url: str, opts: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``s3://key:secret@bucket/…`` -> (``s3://bucket/…``, options with key and secret): s3fs itself would take
    ``key:secret@bucket`` for the bucket's name and put it, secret and all, into its error messages."""
    m = _USERINFO.search(url)
    if not m:
        return url, opts
    key, _, secret = m.group(0)[:-1].partition(":")
    return redact_url(url), {**opts, "key": unquote(key), "secret": unquote(secret)}


@contextlib.contextmanager
def naming_errors(url: str, action: str) -> Iterator[None]:
    """Re-raise a remote storage failure with the URL and the action in its message (local OS errors already name
    their path). FileNotFoundError and PermissionError keep their type: callers tell "missing" from "failed"."""
    try:
        yield
    except Exception as e:
        if is_local(url) or isinstance(e, (ValueError, TypeError)) or getattr(e, "_ldm_named", False):
            raise
        msg = f"{action} {redact_url(url)} failed: {type(e).__name__}: {e}"
        if isinstance(e, FileNotFoundError):
            wrapped: OSError = FileNotFoundError(errno.ENOENT, msg)
        elif isinstance(e, PermissionError):
            wrapped = PermissionError(errno.EACCES, msg)
        else:
            wrapped = StorageError(msg)
        wrapped._ldm_named = True  # type: ignore[attr-defined]  (nested helpers name it once)
        raise wrapped from e


def protocol_of(url: str) -> str:
    p = fsspec.utils.get_protocol(str(url))
    return "file" if p in ("file", "local") else p


def get_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URL. s3 options default to the environment's."""
    url = str(url)
    opts = dict(storage_options or {})
    if protocol_of(url) == "s3":
        url, opts = _s3_inline_credentials(url, {**s3_options_from_env(), **opts})
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs, path


def contained_path(rel: str) -> str | None:
    """``rel`` normalized, or None when it names nothing under the root it is joined to: an absolute path, one that
    climbs out with ``..``, a URL (``file://…``, ``s3://other-bucket/…``), a NUL byte, or the root itself."""
    rel = str(rel)
    if not rel or "\x00" in rel or "://" in rel or rel.startswith(("/", "\\")):
        return None
    norm = posixpath.normpath(rel)
    if norm in ("..", ".") or norm.startswith("../"):
        return None
    return norm


def join(url: str, *parts: str) -> str:
    url = str(url).rstrip("/")
    if protocol_of(url) == "file" and "://" not in url:
        return os.path.join(url, *parts)
    return posixpath.join(url, *parts)


def is_local(url: str) -> bool:
    return protocol_of(str(url)) == "file"


def local_path(url: str) -> str:
    """The filesystem path of a local URL (``file:///x`` -> ``/x``)."""
    url = str(url)
    return url[len("file://") :] if url.startswith("file://") else url


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = get_fs(url, storage_options)
    if not isinstance(fs, LocalFileSystem):
        fs.invalidate_cache(path)  # asked of storage, not of a listing cached before another writer wrote
    with naming_errors(url, "checking"):
        return fs.exists(path)


def makedirs(url: str, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = get_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(path, exist_ok=True)
    # object stores have no directories to create


class TooLarge(ValueError):
    """A file over the byte limit its reader set (`read_bytes` ``max_bytes``)."""


def read_bytes(url: str, storage_options: dict[str, Any] | None = None, max_bytes: int | None = None) -> bytes:
    """The file's bytes. With ``max_bytes``, at most that many are read: a larger file (or one that never ends,
    like ``/dev/zero``) raises `TooLarge` after reading ``max_bytes + 1`` bytes, whatever size its listing gave."""
    fs, path = get_fs(url, storage_options)
    if not isinstance(fs, LocalFileSystem):
        # one GET of the current object: fs.open would check it against an ETag cached by an earlier read, and
        # fail (FileExpired) on a manifest another writer has committed since
        # (a ranged GET of at most max_bytes + 1 bytes when there is a limit)
        with naming_errors(url, "reading"):
            data = fs.cat_file(path) if max_bytes is None else fs.cat_file(path, start=0, end=max_bytes + 1)
    else:
        with naming_errors(url, "reading"), fs.open(path, "rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLarge(f"{redact_url(url)}: more than {max_bytes} bytes")
    return data


def read_text(url: str, storage_options: dict[str, Any] | None = None) -> str:
    return read_bytes(url, storage_options).decode("utf-8")


def _write_local_atomic(path: str, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into a temp file beside ``path``, fsync it, rename it over ``path`` and fsync the directory: a
    reader sees the old file or the new one, never a partial one, even if this process is killed mid-write."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = _temp_path(directory, path)
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; a report or shard should be readable like any file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def write_bytes_atomic(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` to ``url`` so that a reader never sees a partial file, even if we are killed mid-write."""
    fs, path = get_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        _write_local_atomic(path, lambda f: f.write(data))
    else:
        with naming_errors(url, "writing"):
            fs.pipe_file(path, data)


def write_text_atomic(url: str, text: str, storage_options: dict[str, Any] | None = None) -> None:
    write_bytes_atomic(url, text.encode("utf-8"), storage_options)


def remove_stale_temp_files(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Delete the temporary files that atomic writes killed mid-way left directly under the directory ``url``;
    returns their names. Only for a directory this process is the one writer of (a checkpoint directory, a latent
    store, a dataset: its writer lease's holder, `ldm_core.leases`): a live writer's temporary file would be
    deleted too. Object stores have none (a PUT is
    atomic), so this is a no-op there."""
    fs, path = get_fs(url, storage_options)
    if not isinstance(fs, LocalFileSystem) or not os.path.isdir(path):
        return []
    removed = []
    for name in os.listdir(path):
        if _TEMP_RE.match(name) and os.path.isfile(os.path.join(path, name)):
            try:
                os.unlink(os.path.join(path, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return sorted(removed)


def list_dir(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Base names of the entries directly under ``url`` (empty if it does not exist), sorted."""
    fs, path = get_fs(url, storage_options)
    try:
        with naming_errors(url, "listing"):
            entries = (
                fs.ls(path, detail=False, refresh=True)
                if not isinstance(fs, LocalFileSystem)
                else fs.ls(path, detail=False)
            )
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def remove(url: str, storage_options: dict[str, Any] | None = None, recursive: bool = False) -> None:
    fs, path = get_fs(url, storage_options)
    try:
        with naming_errors(url, "removing"):
            fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass


def walk_files(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """Every file below ``url`` as a path relative to it, in sorted order."""
    fs, root = get_fs(url, storage_options)
    root = root.rstrip("/")
    with naming_errors(url, "listing"):
        found = sorted(fs.find(root))
    for path in found:
        rel = path[len(root) :].lstrip("/")
        yield rel


def open_url(url: str, mode: str = "rb", storage_options: dict[str, Any] | None = None) -> io.IOBase:
    fs, path = get_fs(url, storage_options)
    with naming_errors(url, "opening"):
        return fs.open(path, mode)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# Conditional writes: the primitives that let several processes share one directory safely (`ldm_core.leases`)
# ---------------------------------------------------------------------------------------------------------------
#
# A version names one content of one object: on S3 its ETag, locally the sha256 of its bytes. A conditional write
# replaces the object only if it still holds the version the writer last saw (compare-and-swap), so of two writers
# that read the same version, one wins and the other learns it lost instead of silently overwriting.
#
# S3 (and moto) does the compare on the server: PUT with If-Match / If-None-Match, DELETE with If-Match, answering
# 412 PreconditionFailed or 409 ConditionalRequestConflict when it does not hold. Locally, an exclusive
# flock on the object's directory serializes the compare and the atomic rename; flock is advisory and must work
# on the filesystem (local disks do; some network filesystems do not).

_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def _version_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _s3_conflict(e: BaseException) -> bool:
    """Whether an S3 failure (s3fs wraps botocore's ClientError) is a failed precondition."""
    err: BaseException | None = e
    for _ in range(4):  # (naming_errors and s3fs each wrap it once)
        if err is None:
            break
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _CONFLICT_CODES or status in ("412", "409"):
                return True
        err = err.__cause__ or err.__context__
    return False


def _s3_bucket_key(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


def _s3_call(fs: Any, method: str, **kwargs: Any) -> Any:
    return fsspec.asyn.sync(fs.loop, fs._call_s3, method, **kwargs)


def _s3_get(fs: Any, path: str) -> tuple[bytes, str] | None:
    bucket, key = _s3_bucket_key(path)

    async def get() -> tuple[bytes, str]:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with resp["Body"] as body:
            data = await body.read()
        return data, resp["ETag"]

    try:
        return fsspec.asyn.sync(fs.loop, get)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _local_lock(path: str) -> Iterator[None]:
    """An exclusive flock on the directory holding ``path``, around a local compare-and-swap (on the directory
    itself, so no lock file is left beside the data; the writes it guards are tiny)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_local(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_versioned(url: str, storage_options: dict[str, Any] | None = None) -> tuple[bytes, str] | None:
    """(content, version) of ``url`` read in one request, or None when it does not exist."""
    fs, path = get_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        data = _read_local(path)
        return None if data is None else (data, _version_of(data))
    with naming_errors(url, "reading"):
        return _s3_get(fs, path)


def write_if_version(
    url: str, data: bytes, expected: str | None, storage_options: dict[str, Any] | None = None
) -> str | None:
    """Write ``data`` to ``url`` only if it still holds version ``expected`` (None: only if it does not exist).
    Returns the new version, or None when the object had changed (nothing was written)."""
    fs, path = get_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        with _local_lock(path):
            current = _read_local(path)
            if (None if current is None else _version_of(current)) != expected:
                return None
            _write_local_atomic(path, lambda f: f.write(data))
        return _version_of(data)
    bucket, key = _s3_bucket_key(path)
    condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
    try:
        with naming_errors(url, "writing"):
            resp = _s3_call(fs, "put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except OSError as e:
        if not _s3_conflict(e):
            raise
        # a retried PUT whose first attempt landed also fails its precondition: then the object is ours
        now = _s3_get(fs, path)
        return now[1] if now is not None and now[0] == data else None
    finally:
        fs.invalidate_cache(path)
    return resp["ETag"]


def write_if_absent(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> str | None:
    """Create ``url`` with ``data`` only if nothing is there yet (an immutable file no other writer may replace).
    Returns its version, or None when something already was there (nothing was written). Locally the file is
    written whole to a temp file and hard-linked to its name, which fails if the name exists."""
    fs, path = get_fs(url, storage_options)
    if not isinstance(fs, LocalFileSystem):
        return write_if_version(url, data, None, storage_options)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = _temp_path(directory, path)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(directory)
    return _version_of(data)


def delete_if_version(url: str, expected: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Delete ``url`` only if it still holds version ``expected``; False when it changed or is gone."""
    fs, path = get_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        with _local_lock(path):
            current = _read_local(path)
            if current is None or _version_of(current) != expected:
                return False
            os.unlink(path)
        return True
    bucket, key = _s3_bucket_key(path)
    try:
        _s3_call(fs, "head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return False  # (S3 answers a DELETE of a missing key with success)
    try:
        with naming_errors(url, "removing"):
            _s3_call(fs, "delete_object", Bucket=bucket, Key=key, IfMatch=expected)
    except OSError as e:
        if not _s3_conflict(e):
            raise
        return False
    finally:
        fs.invalidate_cache(path)
    return True
