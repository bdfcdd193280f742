"""The embedded default sources: coloured shapes (deterministic, captions true to the pixels) and crops of the
scikit-image photographs."""

import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_core.data import ImageShardDataset, IngestConfig, ingest, write_photo_crops_source, write_shapes_source
from ldm_core.data.photos import PHOTOS, available_photos
from ldm_core.data.synthetic import COLORS, COMBINATIONS, POSITIONS, SHAPES, SIZES

CAPTION_RE = re.compile(
    r"^a (small|large) (\w+) (circle|square|triangle) "
    r"(?:in the (top left|top right|bottom left|bottom right|center)|at the (top|bottom)|on the (left|right))$"
)


def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def metadata(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


def test_shapes_are_deterministic_from_the_seed(tmp_path):
    write_shapes_source(str(tmp_path / "a"), 30, seed=7)
    write_shapes_source(str(tmp_path / "b"), 30, seed=7)
    write_shapes_source(str(tmp_path / "c"), 30, seed=8)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(a) == 31 and a == b  # 30 PNGs + metadata.jsonl, byte-identical
    assert a["metadata.jsonl"] != c["metadata.jsonl"]


def test_shapes_counts_are_balanced_and_captions_match_attributes(tmp_path):
    rows = write_shapes_source(str(tmp_path), len(COMBINATIONS) + 10, seed=0)
    assert rows == metadata(tmp_path)
    assert len(rows) == len(COMBINATIONS) + 10 == 226
    # the first 216 hold every combination once
    first = Counter((r["shape"], r["color"], r["size"], r["position"]) for r in rows[: len(COMBINATIONS)])
    assert set(first) == set(COMBINATIONS) and set(first.values()) == {1}
    for r in rows:
        m = CAPTION_RE.match(r["text"])
        assert m, r["text"]
        size, color, shape = m.group(1), m.group(2), m.group(3)
        position = next(g for g in m.groups()[3:] if g)
        assert (size, color, shape, position) == (r["size"], r["color"], r["shape"], r["position"])
    assert len(SHAPES) >= 3 and len(COLORS) >= 4 and len(POSITIONS) == 9


def _measure(image: np.ndarray, background: np.ndarray) -> dict:
    """What an evaluator would read off one shape image, independent of how it was drawn."""
    diff = np.abs(image.astype(float) - background).sum(-1)  # (H, W)
    mask = diff > 0
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    inside = image[int(cy), int(cx)].astype(float)  # the centre of the box is inside every shape
    coverage = diff / max(np.abs(inside - background).sum(), 1e-9)  # 1 inside, fractional on anti-aliased edges
    fill = coverage.sum() / ((x1 - x0) * (y1 - y0))
    return {"cx": cx, "cy": cy, "side": max(x1 - x0, y1 - y0), "color": inside, "fill": fill}


def test_shape_pixels_show_the_captioned_colour_shape_size_and_position(tmp_path):
    rows = write_shapes_source(str(tmp_path), 216, seed=1, size=32)
    # closed-form fill ratios of the bounding box: circle pi/4, square 1, triangle 1/2
    fills = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
    thirds = {0: (0, 13), 1: (13, 19), 2: (19, 32)}
    for r in rows:
        a = np.asarray(Image.open(tmp_path / r["file_name"]).convert("RGB"))
        assert a.shape == (32, 32, 3)
        background = a[0, 0].astype(float) if r["position"] != "top left" else a[-1, -1].astype(float)
        assert background.min() >= 220 and np.ptp(background) == 0  # plain light grey
        m = _measure(a, background)
        # colour: the exact colour inside, and the nearest palette colour is the captioned one
        nearest = min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - m["color"]).sum())
        assert nearest == r["color"] and np.abs(np.array(COLORS[r["color"]]) - m["color"]).max() <= 2
        assert min(fills, key=lambda s: abs(fills[s] - m["fill"])) == r["shape"], (r, m["fill"])
        # size: at least 10 px across, the two sizes far apart
        assert abs(m["side"] - SIZES[r["size"]] * 32) <= 1.5 and m["side"] >= 10
        row, col = POSITIONS[r["position"]]
        assert thirds[col][0] <= m["cx"] < thirds[col][1] and thirds[row][0] <= m["cy"] < thirds[row][1], r


def test_shapes_source_ingests_with_attribute_columns(tmp_path):
    rows = write_shapes_source(str(tmp_path / "src"), 24, seed=2)
    result = ingest(IngestConfig(source=str(tmp_path / "src"), val_fraction=0.0), str(tmp_path / "out"))
    assert (result.rows_new, result.bad, result.converted) == (24, {}, {})  # clean PNGs: stored as generated
    ds = ImageShardDataset(str(tmp_path / "out"), "train", resolution=32)
    by_caption = {r["text"]: r for r in rows}
    for i, got in enumerate(ds.rows(range(len(ds)))):
        want = by_caption[got["caption"]]
        assert {k: got[k] for k in ("color", "shape", "size", "position")} == {
            k: want[k] for k in ("color", "shape", "size", "position")
        }
        ref = np.asarray(Image.open(tmp_path / "src" / want["file_name"]), dtype=np.float32)
        assert np.allclose(ds[i].numpy(), ref.transpose(2, 0, 1) / 127.5 - 1)


def test_photo_crops_are_the_real_photographs(tmp_path):
    import skimage.data

    names = available_photos()
    assert {"astronaut", "chelsea", "coffee"} <= set(names) <= set(PHOTOS)
    rows = write_photo_crops_source(str(tmp_path / "a"), size=32, per_image=3, seed=5)
    assert rows == metadata(tmp_path / "a") and len(rows) == 3 * len(names)
    write_photo_crops_source(str(tmp_path / "b"), size=32, per_image=3, seed=5)
    assert files(tmp_path / "a") == files(tmp_path / "b")  # deterministic from the seed
    for r in rows:
        assert r["text"] == f"a photo crop of the {r['photo'].replace('_', ' ')} image"
        # an independent recomputation from scikit-image's array: the stored crop is exactly that region
        photo = getattr(skimage.data, r["photo"])()
        top, left, c = r["crop_top"], r["crop_left"], r["crop_size"]
        assert 32 <= c <= min(photo.shape[:2]) // 2 + 1
        ref = Image.fromarray(photo[top : top + c, left : left + c]).resize((32, 32), Image.Resampling.LANCZOS)
        got = Image.open(io.BytesIO((tmp_path / "a" / r["file_name"]).read_bytes()))
        assert got.size == (32, 32) and np.array_equal(np.asarray(got), np.asarray(ref))
        # natural-image statistics: neighbours are far more alike than random pixel pairs (noise has ratio ~1)
        a = np.asarray(got, dtype=float)
        neighbours = np.abs(np.diff(a, axis=1)).mean()
        shuffled = np.random.default_rng(0).permutation(a.reshape(-1, 3))
        random_pairs = np.abs(shuffled[1:] - shuffled[:-1]).mean()
        assert a.std() > 5 and neighbours < 0.8 * random_pairs, r


def test_photo_crops_ingest(tmp_path):
    write_photo_crops_source(str(tmp_path / "src"), size=32, per_image=1, seed=0, photos=("astronaut", "coffee"))
    result = ingest(IngestConfig(source=str(tmp_path / "src")), str(tmp_path / "out"))
    assert result.rows_new == 2 and result.bad == {}
    ds = ImageShardDataset(str(tmp_path / "out"), None, resolution=16)
    assert sorted(r["photo"] for r in ds.rows(range(2))) == ["astronaut", "coffee"]
    assert ds.get_batch([0, 1]).shape == (2, 3, 16, 16)


def test_unknown_photo_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="none of the scikit-image photos"):
        write_photo_crops_source(str(tmp_path), photos=("no_such_photo",))
