"""Ingestion of user image–caption sources into canonical shards: layouts, local and s3://, dirty input,
incremental runs, the bad-fraction guard, and the dataset that reads the result."""

import io
import json
import logging
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ldm_core import storage
from ldm_core.data import ImageShardDataset, IngestConfig, IngestError, ingest
from ldm_core.data.canonical import CORE_COLUMNS, read_manifest, split_of
from ldm_core.data.images import pixel_sha256

# --------------------------------------------------------------------------------------------------------------
# Image builders
# --------------------------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def solid(color, size=(24, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


def pattern(seed: int, size=(24, 16)) -> Image.Image:
    """A distinct RGB image per seed (distinct pixel hash)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png16_rgb(a: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one): (H, W, 3) uint16."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def put(root: str, rel: str, data: bytes | str) -> None:
    if isinstance(data, str):
        data = data.encode("utf-8")
    storage.write_bytes_atomic(storage.join(root, rel), data)


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def shard_rows(out: str) -> list[dict]:
    manifest = read_manifest(out)
    rows = []
    for name in manifest.shard_names():
        with storage.open_url(storage.join(out, name)) as f:
            rows += pq.read_table(f).to_pylist()
    return rows


# --------------------------------------------------------------------------------------------------------------
# Layouts, local and S3
# --------------------------------------------------------------------------------------------------------------

CAPTIONS = ["un café très chaud ☕", "日本語のキャプション", "a plain caption", "Zürich at night — ünïcödé"]


def write_layout(root: str, layout: str) -> list[Image.Image]:
    """Four images with CAPTIONS and attributes (city, score) in the given layout; returns the images."""
    images = [pattern(i) for i in range(4)]
    cities = ["Zürich", "東京", "Paris", "Köln"]
    if layout in ("jsonl", "csv"):
        for i, im in enumerate(images):
            put(root, f"imgs/{i}.png", encode(im))
        if layout == "jsonl":
            lines = [
                json.dumps(
                    {"file_name": f"imgs/{i}.png", "text": CAPTIONS[i], "city": cities[i], "score": i},
                    ensure_ascii=False,
                )
                for i in range(4)
            ]
            put(root, "metadata.jsonl", "\n".join(lines) + "\n")
        else:
            buf = io.StringIO()
            import csv

            w = csv.writer(buf)
            w.writerow(["file_name", "text", "city", "score"])
            for i in range(4):
                w.writerow([f"imgs/{i}.png", CAPTIONS[i], cities[i], i])
            put(root, "metadata.csv", buf.getvalue())
    elif layout == "sidecar":
        for i, im in enumerate(images):
            put(
                root,
                f"{i}.jpg" if i % 2 else f"{i}.png",
                encode(im, "PNG") if i % 2 == 0 else encode(im, "JPEG", quality=95),
            )
            put(root, f"{i}.txt", CAPTIONS[i] + "\n")
    elif layout in ("parquet_struct", "parquet_binary"):
        image_type = (
            pa.struct([("bytes", pa.binary()), ("path", pa.string())]) if layout == "parquet_struct" else pa.binary()
        )
        image_col = "image" if layout == "parquet_struct" else "jpg"
        caption_col = "text" if layout == "parquet_struct" else "caption"
        for part in range(2):  # two shards, HF style
            idx = [2 * part, 2 * part + 1]
            imgs = [
                {"bytes": encode(images[i]), "path": f"{i}.png"} if layout == "parquet_struct" else encode(images[i])
                for i in idx
            ]
            table = pa.table(
                {
                    image_col: pa.array(imgs, type=image_type),
                    caption_col: [CAPTIONS[i] for i in idx],
                    "city": [cities[i] for i in idx],
                    "score": [i for i in idx],
                    "tags": [["a", "b"], ["c"]],  # not a scalar: not carried
                }
            )
            buf = io.BytesIO()
            pq.write_table(table, buf)
            put(root, f"data/train-{part:05d}-of-00002.parquet", buf.getvalue())
    if layout.startswith("parquet"):
        # the detected layout must ignore the card
        put(root, "README.md", "# dataset card")
    return images


LAYOUTS = ["jsonl", "csv", "sidecar", "parquet_struct", "parquet_binary"]


def check_layout_result(src: str, out: str, layout: str, images, result, storage_options=None):
    assert result.layout == ("parquet" if layout.startswith("parquet") else "imagefolder")
    assert (result.rows_new, result.rows_total, result.bad, result.skipped_duplicates) == (4, 4, {}, 0)
    rows = shard_rows(out) if storage_options is None else None
    ds = ImageShardDataset(out, split=None, resolution=16, storage_options=storage_options)
    assert len(ds) == 4
    for k, row in enumerate(ds.rows(range(4))):
        i = CAPTIONS.index(row["caption"])  # every caption (and every non-ASCII one) arrives intact
        im = images[i]
        assert (row["width"], row["height"]) == im.size
        assert row["split"] == split_of(row["sha256"], 0.05)
        decoded = ds.pil_image(k)
        if layout == "sidecar" and i % 2:  # a clean JPEG is kept byte for byte (decoding it is lossy)
            assert ds.image_bytes(k) == encode(im, "JPEG", quality=95)
        else:
            assert np.array_equal(np.asarray(decoded), np.asarray(im))
            assert row["sha256"] == pixel_sha256(im)
        if layout != "sidecar":
            assert row["city"] == ["Zürich", "東京", "Paris", "Köln"][i]
            # CSV has no types: its attributes stay text
            assert row["score"] == (str(i) if layout == "csv" else i)
            assert "tags" not in row
    assert sorted(ds.captions) == sorted(CAPTIONS)
    if rows is not None:
        assert list(rows[0])[: len(CORE_COLUMNS)] == list(CORE_COLUMNS)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_local_layouts_round_trip(tmp_path, layout):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    images = write_layout(src, layout)
    result = ingest(IngestConfig(source=src), out)
    check_layout_result(src, out, layout, images, result)


@pytest.mark.parametrize("layout", ["jsonl", "sidecar", "parquet_struct"])
def test_s3_layouts_round_trip(s3_url, layout):
    src, out = f"{s3_url}/src", f"{s3_url}/out"
    images = write_layout(src, layout)
    result = ingest(IngestConfig(source=src), out)
    check_layout_result(src, out, layout, images, result, storage_options={})
    assert read_manifest(out).shard_names() == result.shards
    # and again: an object store lists ETags; an unchanged source is not read twice
    again = ingest(IngestConfig(source=src), out)
    assert (again.rows_new, again.sources_new, again.new_shards) == (0, 0, [])


def test_explicit_storage_options_are_never_logged_or_stored(s3_endpoint, s3_url, caplog, tmp_path):
    secret = "SECRET-do-not-log-4242"
    opts = s3_endpoint.storage_options()
    opts["secret"] = secret  # moto accepts any secret; the point is where the string ends up
    src = f"{s3_url}/src"
    write_layout(src, "jsonl")
    config = IngestConfig(source=src, storage_options=opts)
    with caplog.at_level(logging.DEBUG, logger="ldm_core"):
        result = ingest(config, str(tmp_path / "out"))
    assert result.rows_new == 4
    texts = [caplog.text, repr(config), json.dumps(config.to_dict()), result.model_dump_json()]
    texts.append((tmp_path / "out" / "manifest.json").read_text())
    assert not any(secret in t for t in texts)


# --------------------------------------------------------------------------------------------------------------
# Dirty input: every kind counted exactly, every good image arrives right
# --------------------------------------------------------------------------------------------------------------

RED, BLUE = (255, 0, 0), (0, 0, 255)


def write_dirty_corpus(root: str) -> dict:
    """An imagefolder (metadata.jsonl for some files, sidecars for others) with every kind of bad input."""
    meta = {}  # file -> caption (metadata.jsonl)
    files = {}

    def add(name, data, caption=None, sidecar=None):
        files[name] = data
        if caption is not None:
            meta[name] = caption
        if sidecar is not None:
            files[name.rsplit(".", 1)[0] + ".txt"] = sidecar

    good_png = encode(pattern(1))
    good_jpg = encode(pattern(2), "JPEG", quality=90)
    add("a_good.png", good_png, "a good png")
    add("a_good.jpg", good_jpg, "a good jpeg")
    cmyk = Image.new("CMYK", (20, 20), (0, 255, 255, 0))  # pure red in CMYK
    add("cmyk.jpg", encode(cmyk, "JPEG", quality=95), "cmyk red")
    gray16 = np.arange(20 * 20, dtype=np.uint16).reshape(20, 20) * 160  # up to 63840: over 8 bits
    add("gray16.png", encode(Image.fromarray(gray16)), "sixteen bit gray")
    rgb16 = np.zeros((12, 14, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 0x8000, 0x3456
    add("rgb16.png", png16_rgb(rgb16), "sixteen bit colour")
    gray = np.tile(np.arange(0, 200, 10, dtype=np.uint8), (16, 1))  # (16, 20)
    add("gray.png", encode(Image.fromarray(gray)), "gray ramp")
    pal = Image.new("P", (16, 16))
    pal.putpalette([10, 200, 30] + [0, 0, 0] * 255)
    add("palette.png", encode(pal), "a palette image")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 2], rgba[..., 3] = 255, 128  # half-transparent blue
    add("rgba.png", encode(Image.fromarray(rgba)), "half transparent blue")
    la = np.zeros((16, 16, 2), np.uint8)
    la[..., 0], la[..., 1] = 0, 64  # quarter-opaque black
    add("la.png", encode(Image.fromarray(la, mode="LA")), "quarter black")
    stored = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide, 20 high: left half red, right half blue
    stored[:, :20] = RED
    stored[:, 20:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    add("rotated.jpg", encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()), "rotated")
    add("long.png", encode(pattern(3)), "word " * 100)
    add("latin1.png", encode(pattern(4)), sidecar="caf\xe9 au lait".encode("latin-1"))
    add("sidecar_ok.png", encode(pattern(5)), sidecar=b"from a sidecar ")
    # bad ones
    add("truncated.jpg", encode(pattern(6, (40, 40)), "JPEG")[:700], "truncated")
    add("random.png", np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes(), "noise")
    add("tiny.png", encode(pattern(7, (4, 4))), "tiny")
    add("bomb.png", encode(solid((1, 2, 3), (100, 100))), "a bomb over the tiny pixel limit")
    add("no_caption.png", encode(pattern(8)))
    add("empty_caption.png", encode(pattern(9)), "   ")
    meta["not_there.png"] = "a metadata row whose image is missing"
    # duplicates of a_good.png: a byte copy and the same pixels as BMP
    add("z_dup_copy.png", good_png, "copy")
    add("z_dup.bmp", encode(pattern(1), "BMP"), "bmp copy")
    files["notes.md"] = b"not data"
    files[".DS_Store"] = b"\x00\x01"
    for name, data in files.items():
        put(root, name, data)
    lines = [json.dumps({"file_name": k, "text": v, "quality": "q-" + k}, ensure_ascii=False) for k, v in meta.items()]
    lines.insert(3, "{not json")
    put(root, "metadata.jsonl", "\n".join(lines) + "\n")
    return {"good_png": good_png, "good_jpg": good_jpg}


DIRTY_CONFIG = dict(max_pixels=48 * 48, min_size=8, max_caption_chars=50, caption_policy="drop", rows_per_shard=5)


def test_dirty_source_counts_every_reason_and_keeps_every_good_image(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    originals = write_dirty_corpus(src)
    result = ingest(IngestConfig(source=src, **DIRTY_CONFIG), out)

    assert result.bad == {
        "corrupt": 1,
        "decompression_bomb": 1,
        "empty_caption": 1,
        "missing_caption": 1,
        "missing_image": 1,
        "not_an_image": 1,
        "too_small": 1,
    }
    assert result.skipped_duplicates == 2
    assert result.converted == {
        "converted_16bit": 2,
        "converted_alpha": 2,
        "converted_cmyk": 1,
        "converted_exif_orientation": 1,
        "converted_grayscale": 3,
        "converted_palette": 1,
    }
    assert result.caption_fixes == {"caption_non_utf8": 1, "caption_truncated": 1}
    assert result.source_problems == {"bad_metadata_line": 1}
    assert result.ignored_files == 2  # notes.md, .DS_Store
    good = [
        "a_good.jpg", "a_good.png", "cmyk.jpg", "gray.png", "gray16.png", "la.png", "latin1.png", "long.png",
        "palette.png", "rgb16.png", "rgba.png", "rotated.jpg", "sidecar_ok.png",
    ]  # fmt: skip
    assert result.rows_new == result.rows_total == len(good)
    assert result.rows_examined == len(good) + 7 + 2
    assert result.new_shards == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]

    rows = {r["source"]: r for r in shard_rows(out)}
    assert sorted(rows) == good

    def pixels(name):
        im = decode(rows[name]["image"])
        assert im.mode == "RGB"
        a = np.asarray(im)
        assert a.shape == (rows[name]["height"], rows[name]["width"], 3)
        assert rows[name]["sha256"] == pixel_sha256(im)  # the hash is recomputable from the stored bytes
        return a.astype(int)

    # clean files keep their exact bytes; everything converted is stored as PNG
    assert rows["a_good.png"]["image"] == originals["good_png"]
    assert rows["a_good.jpg"]["image"] == originals["good_jpg"]
    assert decode(rows["cmyk.jpg"]["image"]).format == "PNG"
    assert np.abs(pixels("cmyk.jpg") - RED).max() <= 3
    # 16-bit -> 8-bit by the high byte, never clipped
    assert np.array_equal(pixels("gray16.png")[..., 0], (np.arange(400).reshape(20, 20) * 160) >> 8)
    assert np.array_equal(pixels("rgb16.png")[0, 0], [255, 0x80, 0x34])
    g = pixels("gray.png")
    assert np.array_equal(g[..., 0], g[..., 2]) and np.array_equal(g[0, :, 1], np.arange(0, 200, 10))
    assert np.array_equal(pixels("palette.png")[3, 3], [10, 200, 30])
    # alpha composited on white: out = a*c + (1-a)*255
    assert np.abs(pixels("rgba.png")[5, 5] - [127, 127, 255]).max() <= 1
    assert np.abs(pixels("la.png")[5, 5] - round(255 * (1 - 64 / 255))).max() <= 1
    # EXIF orientation applied: 40x20 stored becomes 20x40, the stored left (red) half is now on top
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (20, 40)
    r = pixels("rotated.jpg")
    assert np.abs(r[5, 10] - RED).max() < 40 and np.abs(r[34, 10] - BLUE).max() < 40
    assert rows["long.png"]["caption"] == ("word " * 100)[:50].rstrip()
    assert rows["latin1.png"]["caption"] == "caf\ufffd au lait"
    assert rows["sidecar_ok.png"]["caption"] == "from a sidecar"
    assert rows["gray.png"]["quality"] == "q-gray.png"  # metadata attribute carried
    assert rows["latin1.png"]["quality"] is None  # sidecar-captioned: no attributes

    # nothing new on a rerun: bad entries are remembered too
    again = ingest(IngestConfig(source=src, **DIRTY_CONFIG), out)
    assert (again.rows_new, again.rows_examined, again.bad, again.new_shards) == (0, 0, {}, [])


@pytest.mark.parametrize(
    "policy, expected",
    [("drop", None), ("empty", ""), ("filename", "red fox 01")],
)
def test_caption_policy(tmp_path, policy, expected):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    put(src, "red_fox-01.png", encode(pattern(1)))
    put(src, "b.png", encode(pattern(2)))
    put(src, "b.txt", "captioned")
    result = ingest(IngestConfig(source=src, caption_policy=policy), out)
    captions = {r["source"]: r["caption"] for r in shard_rows(out)}
    if expected is None:
        assert result.bad == {"missing_caption": 1} and "red_fox-01.png" not in captions
    else:
        assert result.bad == {} and captions["red_fox-01.png"] == expected
        assert result.caption_fixes == {"caption_missing_filled": 1}
    assert captions["b.png"] == "captioned"


def test_image_dropped_for_missing_caption_is_ingested_once_its_caption_lands(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    put(src, "a.png", encode(pattern(1)))
    put(src, "b.png", encode(pattern(2)))
    put(src, "b.txt", "b")
    first = ingest(IngestConfig(source=src), out)
    assert (first.rows_new, first.bad) == (1, {"missing_caption": 1})
    assert ingest(IngestConfig(source=src), out).rows_examined == 0
    put(src, "a.txt", "a, at last")
    third = ingest(IngestConfig(source=src), out)
    assert (third.rows_new, third.rows_total, third.sources_new) == (1, 2, 1)


# --------------------------------------------------------------------------------------------------------------
# The bad-fraction guard
# --------------------------------------------------------------------------------------------------------------


def test_mostly_broken_source_fails_clearly_and_deletes_nothing(tmp_path):
    good_src, bad_src, out = str(tmp_path / "good"), str(tmp_path / "bad"), str(tmp_path / "out")
    for i in range(3):
        put(good_src, f"{i}.png", encode(pattern(i)))
        put(good_src, f"{i}.txt", f"good {i}")
    ingest(IngestConfig(source=good_src, rows_per_shard=2), out)
    before = {n: (tmp_path / "out" / n).read_bytes() for n in read_manifest(out).shard_names()}

    put(bad_src, "ok.png", encode(pattern(10)))
    put(bad_src, "ok.txt", "the one good image")
    for i in range(3):
        put(bad_src, f"junk{i}.png", b"this is not a png at all " * i)
        put(bad_src, f"junk{i}.txt", "junk")
    put(bad_src, "cut.jpg", encode(pattern(11, (64, 64)), "JPEG")[:200])
    put(bad_src, "cut.txt", "cut")
    with pytest.raises(IngestError) as err:
        ingest(IngestConfig(source=bad_src, max_bad_fraction=0.5), out)
    message = str(err.value)
    assert bad_src in message and "not_an_image=3" in message and "corrupt=1" in message
    assert err.value.result.bad == {"corrupt": 1, "not_an_image": 3} and err.value.result.status == "failed"
    # earlier shards untouched; the one good row of the failed run is kept, not deleted
    manifest = read_manifest(out)
    assert {n: (tmp_path / "out" / n).read_bytes() for n in before} == before
    assert manifest.counts.rows == 4 and manifest.runs[-1].status == "failed"
    # the broken entries were not recorded as ingested: the unchanged source fails again
    with pytest.raises(IngestError):
        ingest(IngestConfig(source=bad_src, max_bad_fraction=0.5), out)
    # an operator who accepts the loss raises the limit; then the source is done
    accepted = ingest(IngestConfig(source=bad_src, max_bad_fraction=1.0), out)
    assert (accepted.rows_new, accepted.bad, accepted.rows_total) == (0, {"corrupt": 1, "not_an_image": 3}, 4)
    assert ingest(IngestConfig(source=bad_src, max_bad_fraction=0.5), out).rows_examined == 0


# --------------------------------------------------------------------------------------------------------------
# Incremental ingestion
# --------------------------------------------------------------------------------------------------------------


def test_incremental_ingestion_adds_only_new_shards(tmp_path):
    from ldm_core.data import write_shapes_source

    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    write_shapes_source(src, 5, seed=3)
    config = IngestConfig(source=src, rows_per_shard=2)
    first = ingest(config, out)
    assert first.new_shards == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    snapshot = {n: (tmp_path / "out" / n).read_bytes() for n in first.shards}

    second = ingest(config, out)
    assert (second.rows_new, second.new_shards, second.sources_new, second.sources_seen) == (0, [], 0, 5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*snapshot, "manifest.json"])

    # the source grows: the same seed regenerates the first 5 identically and adds 3
    write_shapes_source(src, 8, seed=3)
    # a shard an interrupted run left behind (written, never entered in the manifest) is never overwritten
    (tmp_path / "out" / "shard-00003.parquet").write_bytes(b"orphan")
    third = ingest(config, out)
    assert (third.rows_new, third.rows_total, third.sources_new) == (3, 8, 3)
    assert third.new_shards == ["shard-00004.parquet", "shard-00005.parquet"]
    assert (tmp_path / "out" / "shard-00003.parquet").read_bytes() == b"orphan"
    assert {n: (tmp_path / "out" / n).read_bytes() for n in snapshot} == snapshot
    ds = ImageShardDataset(out, split=None)
    assert len(ds) == 8 and sorted(r["source"] for r in ds.rows(range(8))) == [f"{i:06d}.png" for i in range(8)]


# --------------------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------------------


def test_dataset_tensors_splits_and_rows(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    images = [pattern(i, (8, 8)) for i in range(40)]
    for i, im in enumerate(images):
        put(src, f"{i:02d}.png", encode(im))
        put(src, f"{i:02d}.txt", f"caption {i}")
    wide = np.zeros((20, 40, 3), np.uint8)  # left half red, right half blue
    wide[:, :20], wide[:, 20:] = RED, BLUE
    put(src, "wide.png", encode(Image.fromarray(wide)))
    put(src, "wide.txt", "wide")
    ingest(IngestConfig(source=src, rows_per_shard=16, val_fraction=0.3), out)

    train = ImageShardDataset(out, "train", resolution=8, max_cached_shards=1)
    val = ImageShardDataset(out, "validation", resolution=8, cache_decoded=True)
    assert len(train) + len(val) == 41 and len(val) > 0 and len(train) > 0
    for ds, split in ((train, "train"), (val, "validation")):
        for row in ds.rows(range(len(ds))):
            assert row["split"] == split == split_of(row["sha256"], 0.3)
    # exact pixels: (3, H, W) = image / 127.5 - 1, for every row (and across shard cache evictions)
    by_caption = {f"caption {i}": im for i, im in enumerate(images)}
    for ds in (train, val):
        for i, row in enumerate(ds.rows(range(len(ds)))):
            x = ds[i]
            assert x.shape == (3, 8, 8) and x.dtype.is_floating_point
            if row["caption"] != "wide":
                ref = np.asarray(by_caption[row["caption"]], dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1
                assert np.allclose(x.numpy(), ref, atol=1e-6)
        batch = ds.get_batch(list(range(len(ds)))[::-1])
        assert batch.shape == (len(ds), 3, 8, 8)
        assert all(np.array_equal(batch[len(ds) - 1 - i].numpy(), ds[i].numpy()) for i in range(len(ds)))
    # resize the shorter side to 8, centre-crop: the 40x20 image shows red on the left, blue on the right
    both = ImageShardDataset(out, None, resolution=8)
    k = both.captions.index("wide")
    x = both[k]
    assert np.allclose(x[:, :, 0].numpy().T, [[1, -1, -1]] * 8, atol=0.02)
    assert np.allclose(x[:, :, 7].numpy().T, [[-1, -1, 1]] * 8, atol=0.02)
    assert both.rows([k])[0]["width"] == 40
    with pytest.raises(IndexError):
        both[len(both)]


def test_parquet_referenced_images_and_a_broken_shard_are_handled(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    images = [pattern(i) for i in range(3)]
    put(src, "data/pics/2.png", encode(images[2]))
    struct_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(
                [
                    {"bytes": encode(images[0]), "path": "0.png"},
                    {"bytes": encode(images[1]), "path": None},
                    {"bytes": None, "path": "pics/2.png"},  # not embedded: read next to the shard
                    {"bytes": None, "path": "pics/missing.png"},
                ],
                type=struct_type,
            ),
            "prompt": ["zero", "one", "two", "three"],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    put(src, "data/train.parquet", buf.getvalue())
    put(src, "data/broken.parquet", b"PAR1 but not really")
    result = ingest(IngestConfig(source=src, layout="parquet"), out)
    assert result.bad == {"corrupt_parquet": 1, "missing_image": 1}
    assert result.rows_new == 3 and result.ignored_files == 1  # the referenced PNG is not itself a row
    rows = {r["caption"]: r for r in shard_rows(out)}
    assert rows["two"]["sha256"] == pixel_sha256(images[2]) and rows["two"]["source"] == "data/train.parquet#2"
    # a corrupt file is remembered like any bad entry (until it changes): a rerun neither re-reads nor fails
    again = ingest(IngestConfig(source=src, layout="parquet"), out)
    assert (again.rows_examined, again.bad) == (0, {})
