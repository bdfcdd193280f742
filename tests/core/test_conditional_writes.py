"""The conditional-write primitives of `ldm_core.storage`, on local disk and on a real S3 endpoint (moto): a write
or delete against a stale version is refused, and an exclusive create never replaces what is there."""

from __future__ import annotations

from ldm_core import storage


def test_compare_and_swap_refuses_a_stale_version(storage_root):
    url = storage.join(storage_root, "manifest.json")
    assert storage.read_versioned(url) is None
    v1 = storage.write_if_version(url, b"one", None)
    assert v1 is not None
    assert storage.write_if_version(url, b"again", None) is None  # must not exist: it does
    assert storage.read_versioned(url) == (b"one", v1)
    v2 = storage.write_if_version(url, b"two", v1)
    assert v2 is not None and v2 != v1
    # a second writer that read v1 loses: its write is refused and the winner's content stays
    assert storage.write_if_version(url, b"stale", v1) is None
    assert storage.read_versioned(url) == (b"two", v2)


def test_delete_if_version(storage_root):
    url = storage.join(storage_root, "lease.json")
    v1 = storage.write_if_version(url, b"a", None)
    v2 = storage.write_if_version(url, b"b", v1)
    assert not storage.delete_if_version(url, v1)  # stale: refused, the object stays
    assert storage.read_versioned(url) == (b"b", v2)
    assert storage.delete_if_version(url, v2)
    assert storage.read_versioned(url) is None
    assert not storage.delete_if_version(url, v2)  # gone


def test_write_if_absent_never_replaces(storage_root):
    url = storage.join(storage_root, "shards", "shard-00000.parquet")
    assert storage.write_if_absent(url, b"first")
    assert not storage.write_if_absent(url, b"second")
    assert storage.read_bytes(url) == b"first"
    if storage.is_local(storage_root):  # no temp file is left behind either way
        assert storage.list_dir(storage.join(storage_root, "shards")) == ["shard-00000.parquet"]
