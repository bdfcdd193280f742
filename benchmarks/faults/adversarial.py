"""Section 8 of the fault campaign: adversarial input. A corpus of sources built to hurt the ingestion — paths that
climb out of the source (absolute, ``..``, ``file://``, ``/dev/zero``) towards a planted secret image, an image over
the byte limit, a decompression bomb (pixels) and a text-chunk bomb (a zTXt inflating to 16 MiB), bytes that are no
image, a truncated PNG, lone surrogates and invalid UTF-8 in
captions and attributes, NUL bytes, a CSV field over the csv module's 128 KiB, a 2 MiB metadata line, JSON nested
100 000 deep, an int of 5000 digits, an oversized sidecar caption, a CSV row with extra fields, a corrupt and a
columnless Parquet file and, on a local disk, a symlink to ``/dev/zero``, a FIFO and a file name that is not UTF-8 —
ingested from a local folder and from ``s3://`` (moto), twice. Every bad row must be dropped under its reason, every
good row kept, the secret never read, and the rerun must read nothing and pass.

Used by tests/faults/test_adversarial_inputs.py and ``python -m benchmarks.faults --only adversarial``.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from benchmarks.faults.table import Row, row
from benchmarks.latent_loader import moto_server
from ldm_core import storage
from ldm_core.data import IngestConfig, IngestResult, ingest
from ldm_core.data.canonical import read_manifest, read_shard
from ldm_core.data.images import clean_image

MAX_IMAGE_BYTES = 32 * 1024
"""The corpus's ``max_image_bytes``: its oversized image is a 128×128 noise PNG (~49 KiB)."""
MAX_BAD_FRACTION = 0.9
"""Most of the corpus is bad on purpose."""
SECRET_COLOR = (13, 37, 42)
"""The planted secret image: a plain 16×16 PNG of this colour outside every source."""
CREDENTIALS = ("AKIAADVERSARIAL0KEY", "adv/Secret+Key/DoNotLeak9")
"""Inline credentials the S3 source URL carries (moto accepts any): they must appear nowhere."""


@dataclass
class Expected:
    """What ingesting one corpus source must report."""

    rows: int
    bad: Counter[str] = field(default_factory=Counter)
    caption_fixes: Counter[str] = field(default_factory=Counter)
    source_problems: Counter[str] = field(default_factory=Counter)


def png(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def good_png(i: int) -> bytes:
    """The i-th good image of the corpus (all distinct, none the secret)."""
    return png(((40 + 37 * i) % 256, (90 + 91 * i) % 256, (200 + 53 * i) % 256))


def noise_png(side: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(side: int = 100_000) -> bytes:
    """A PNG whose header claims ``side``² pixels (10 gigapixels), with a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def text_bomb_png() -> bytes:
    """A good 16×16 PNG carrying a zTXt chunk of ~16 KiB that inflates to 16 MiB (Pillow refuses it: ``corrupt``)."""
    good = png((7, 7, 7))
    data = b"Comment\x00\x00" + zlib.compress(b"\x00" * (16 * 2**20), 9)
    chunk = struct.pack(">I", len(data)) + b"zTXt" + data + struct.pack(">I", zlib.crc32(b"zTXt" + data))
    return good[:33] + chunk + good[33:]  # after the signature (8) and IHDR (25)


def secret_sha(secret: Path) -> str:
    return clean_image(secret.read_bytes(), min_size=1, max_pixels=10**6).sha256


def _jsonl(rows: list[Any]) -> bytes:
    return b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n"


def build_imagefolder(src: Path, secret: Path, local_extras: bool) -> Expected:
    """An imagefolder source under ``src``; ``local_extras``: also a symlink to /dev/zero, a FIFO and a file name
    that is not UTF-8 (what only a local disk can hold)."""
    exp = Expected(rows=0)
    (src / "good").mkdir(parents=True)
    for i in range(7):
        (src / "good" / f"g{i}.png").write_bytes(good_png(i))
    exp.rows += 7
    (src / "bad").mkdir()
    (src / "bad" / "big.png").write_bytes(noise_png())
    (src / "bad" / "bomb.png").write_bytes(bomb_png())
    (src / "bad" / "notimage.png").write_bytes(os.urandom(300))
    (src / "bad" / "trunc.png").write_bytes(good_png(99)[:60])
    (src / "bad" / "textbomb.png").write_bytes(text_bomb_png())
    exp.bad.update(too_large=1, decompression_bomb=1, not_an_image=1, corrupt=2)
    meta: list[Any] = [{"file_name": f"good/g{i}.png", "text": f"good image {i}"} for i in range(4)]
    # json.dumps escapes the lone surrogates: the file holds the six characters \ud800, as a hostile writer would
    meta.append({"file_name": "good/g4.png", "text": "\ud800 lone surrogate", "note": "\udfff", "big": 10**30})
    meta.append(b'{"file_name": "good/g5.png", "text": "caf\xe9 au lait (latin-1, not UTF-8)"}')
    meta.append({"file_name": "good/g6.png", "text": "nul \u0000 inside", "nul\u0000key": 1})
    exp.caption_fixes.update(caption_non_utf8=2)
    for path in (str(secret), os.path.relpath(secret, src), "/dev/zero"):
        meta.append({"file_name": path, "text": "must not be read"})
    exp.bad["path_outside_source"] += 3
    for name in ("big", "bomb", "notimage", "trunc", "textbomb"):
        meta.append({"file_name": f"bad/{name}.png", "text": f"bad {name}"})
    meta.append(b"x" * (2 * 2**20))  # a 2 MiB line that is no JSON
    meta.append(b"[" * 100_000 + b"]" * 100_000)  # nesting deeper than any recursion limit
    meta.append(b'{"file_name": "good/g0.png", "n": ' + b"9" * 5000 + b"}")  # over Python's int-digits limit
    exp.source_problems["bad_metadata_line"] += 3
    (src / "metadata.jsonl").write_bytes(_jsonl(meta))

    (src / "csv").mkdir()
    (src / "csv" / "c0.png").write_bytes(good_png(20))
    (src / "csv" / "c1.png").write_bytes(good_png(21))
    long = "a long caption " * 14_000  # ~200 KiB in one field: over the csv module's default 128 KiB
    (src / "csv" / "metadata.csv").write_text(
        f'file_name,text\nc0.png,"{long}"\nc1.png,two fields too many,x,y\n', encoding="utf-8"
    )
    exp.rows += 2
    exp.caption_fixes["caption_truncated"] += 1
    exp.source_problems["metadata_extra_fields"] += 1

    (src / "sidecar").mkdir()
    (src / "sidecar" / "s0.png").write_bytes(good_png(30))
    (src / "sidecar" / "s0.txt").write_bytes(b"word " * (2**20 // 4))  # 1.25 MiB of caption
    (src / "sidecar" / "s1.png").write_bytes(good_png(31))
    (src / "sidecar" / "s1.txt").write_text("a sidecar caption")
    exp.rows += 1
    exp.bad["caption_too_large"] += 1

    if local_extras:
        (src / "links").mkdir()
        os.symlink("/dev/zero", src / "links" / "zero.png")
        os.mkfifo(src / "links" / "fifo.png")
        with open(os.path.join(os.fsencode(src), b"bad\xff-name.png"), "wb") as f:
            f.write(good_png(40))
        exp.bad.update(not_a_regular_file=2, invalid_file_name=1)
    return exp


def build_parquet(src: Path, secret: Path, local_extras: bool) -> Expected:
    """A Parquet source under ``src`` (the Hugging Face datasets Image feature); ``local_extras``: also a row whose
    path is a symlink to /dev/zero inside the source."""
    exp = Expected(rows=0)
    data = src / "data"
    (data / "imgs").mkdir(parents=True)
    (data / "imgs" / "ref.png").write_bytes(good_png(50))
    images: list[dict[str, Any]] = [{"bytes": good_png(60 + i), "path": f"p{i}.png"} for i in range(4)]
    captions = [f"parquet image {i}" for i in range(4)]
    images.append({"bytes": None, "path": "imgs/ref.png"})  # a non-embedded image inside the source: read
    captions.append("a referenced image")
    exp.rows += 5
    for path in (str(secret), "../" + os.path.relpath(secret, src), "/dev/zero", f"file://{secret}"):
        images.append({"bytes": None, "path": path})
        captions.append("must not be read")
    exp.bad["path_outside_source"] += 4
    images.append({"bytes": noise_png(), "path": "big.png"})
    captions.append("too many bytes")
    exp.bad["too_large"] += 1
    if local_extras:
        os.symlink("/dev/zero", data / "imgs" / "zero.png")
        images.append({"bytes": None, "path": "imgs/zero.png"})
        captions.append("a device")
        exp.bad["not_a_regular_file"] += 1
    table = pa.table(
        {
            "image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "text": captions,
        }
    )
    pq.write_table(table, data / "train-00000.parquet")
    (data / "train-00001.parquet").write_bytes(b"PAR1 this is no parquet file")
    pq.write_table(pa.table({"text": ["no image column here"]}), data / "train-00002.parquet")
    exp.bad.update(corrupt_parquet=1, no_image_column=1)
    return exp


@dataclass
class Corpus:
    root: Path
    secret: Path
    sources: dict[str, tuple[Path, Expected]]
    """name -> (local source folder, what its ingestion must report)"""


def build_corpus(root: Path, local_extras: bool = True) -> Corpus:
    """The corpus under ``root``: the secret image beside (not inside) an imagefolder and a Parquet source."""
    root.mkdir(parents=True, exist_ok=True)
    secret = root / "secret" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(png(SECRET_COLOR))
    sources = {}
    for name, build in (("imagefolder", build_imagefolder), ("parquet", build_parquet)):
        src = root / name
        sources[name] = (src, build(src, secret, local_extras))
    return Corpus(root, secret, sources)


def upload(local: Path, url: str) -> int:
    """Copy the regular files of ``local`` to ``url`` (an object store holds no devices, FIFOs or non-UTF-8 keys)."""
    n = 0
    for dirpath, _, files in os.walk(local):
        for name in files:
            path = Path(dirpath) / name
            if (
                path.is_symlink()
                or not path.is_file()
                or name.encode("utf-8", "surrogateescape") != name.encode("utf-8", "replace")
            ):
                continue
            storage.write_bytes_atomic(storage.join(url, path.relative_to(local).as_posix()), path.read_bytes())
            n += 1
    return n


def ingest_config(source: str, layout: str) -> IngestConfig:
    return IngestConfig(
        source=source,
        layout=layout,
        rows_per_shard=4,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_bad_fraction=MAX_BAD_FRACTION,
        val_fraction=0.0,
    )


def check(result: IngestResult, dataset_url: str, exp: Expected, secret: Path) -> list[str]:
    """What the first ingestion of a corpus source got wrong (empty: all right)."""
    problems = []
    if result.rows_new != exp.rows:
        problems.append(f"rows_new {result.rows_new} != {exp.rows}")
    if result.bad != dict(exp.bad):
        problems.append(f"bad {result.bad} != {dict(sorted(exp.bad.items()))}")
    if result.caption_fixes != dict(exp.caption_fixes):
        problems.append(f"caption_fixes {result.caption_fixes} != {dict(sorted(exp.caption_fixes.items()))}")
    if result.source_problems != dict(exp.source_problems):
        problems.append(f"source_problems {result.source_problems} != {dict(sorted(exp.source_problems.items()))}")
    manifest = read_manifest(dataset_url)
    shas: list[str] = []
    for name in manifest.shard_names() if manifest else []:
        shas += read_shard(dataset_url, name, columns=["sha256"]).column("sha256").to_pylist()
    if len(shas) != exp.rows:
        problems.append(f"{len(shas)} rows stored, {exp.rows} expected")
    if secret_sha(secret) in shas:
        problems.append("the secret image outside the source is in the dataset")
    return problems


def check_rerun(result: IngestResult) -> list[str]:
    """A second ingestion of the unchanged source reads nothing and passes."""
    if result.sources_new or result.rows_new or result.bad or result.status != "ok":
        return [f"rerun read {result.sources_new} entries, {result.rows_new} rows, bad {result.bad}"]
    return []


def run_case(source: str, layout: str, dataset_url: str, exp: Expected, secret: Path) -> list[str]:
    """Ingest ``source`` twice into ``dataset_url``; what went wrong (an exception is a problem too)."""
    try:
        first = ingest(ingest_config(source, layout), dataset_url)
        problems = check(first, dataset_url, exp, secret)
        problems += check_rerun(ingest(ingest_config(source, layout), dataset_url))
    except Exception as e:  # a crash is the defect this section hunts: report it as one
        problems = [f"{type(e).__name__}: {str(e)[:300]}"]
    return [p.replace(c, "<LEAKED>") for p in problems for c in CREDENTIALS] if problems else []


def s3_source_url(bucket_url: str, prefix: str) -> str:
    """``s3://KEY:SECRET@bucket/prefix``: the source URL with the inline `CREDENTIALS`."""
    key, secret = CREDENTIALS
    return bucket_url.replace("s3://", f"s3://{key}:{secret}@", 1) + "/" + prefix


def adversarial(root: Path, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    rows, details = [], {}
    corpus = build_corpus(root / "adversarial")
    for name, (src, exp) in corpus.sources.items():
        t0 = time.monotonic()
        problems = run_case(str(src), name, str(root / "adversarial" / f"ds-{name}"), exp, corpus.secret)
        cases = sum(exp.bad.values()) + sum(exp.caption_fixes.values()) + sum(exp.source_problems.values())
        rows.append(
            row(
                "adversarial input",
                f"{name}, local (ingested twice)",
                1,
                cases,
                0 if problems else cases,
                "; ".join(problems) or "each counted under its reason, good rows kept, secret unread",
                time.monotonic() - t0,
            )
        )
        details[f"{name}-local"] = problems
    s3_corpus = build_corpus(root / "adversarial-s3", local_extras=False)
    with moto_server() as bucket:
        for name, (src, exp) in s3_corpus.sources.items():
            t0 = time.monotonic()
            upload(src, f"{bucket}/src-{name}")
            url = s3_source_url(bucket, f"src-{name}")
            problems = run_case(url, name, f"{bucket}/ds-{name}", exp, s3_corpus.secret)
            cases = sum(exp.bad.values()) + sum(exp.caption_fixes.values()) + sum(exp.source_problems.values())
            rows.append(
                row(
                    "adversarial input",
                    f"{name}, s3:// with inline credentials (twice)",
                    1,
                    cases,
                    0 if problems else cases,
                    "; ".join(problems) or "each counted, no local file read",
                    time.monotonic() - t0,
                )
            )
            details[f"{name}-s3"] = problems
    log(f"  adversarial: {details}")
    return rows, details
