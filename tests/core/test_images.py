"""One image and one caption at a time: the cleaning rules that ingestion counts."""

import io

import numpy as np
import pytest
from PIL import Image

from ldm_core.data.captions import caption_from_filename, clean_caption, decode_text
from ldm_core.data.images import ImageRejected, clean_image, pixel_limit, pixel_sha256


def encode(image, fmt="PNG", **kw):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(seed=0, size=(12, 10)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_pixel_hash_ignores_the_container_but_not_the_pixels():
    im = rgb()
    png, bmp, tif = (clean_image(encode(im, f)) for f in ("PNG", "BMP", "TIFF"))
    assert png.sha256 == bmp.sha256 == tif.sha256 == pixel_sha256(im)
    assert png.kept_original and png.data == encode(im)
    assert bmp.conversions == ("converted_format",) and Image.open(io.BytesIO(bmp.data)).format == "PNG"
    other = np.asarray(im).copy()
    other[0, 0, 0] ^= 1
    assert clean_image(encode(Image.fromarray(other))).sha256 != png.sha256


def test_palette_with_transparency_and_animation():
    p = Image.new("P", (10, 10), 1)
    p.putpalette([0, 0, 0, 200, 10, 10] + [0, 0, 0] * 254)
    p.info["transparency"] = 1  # index 1 fully transparent -> white
    c = clean_image(encode(p))
    assert c.conversions == ("converted_palette", "converted_alpha")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(c.data)))[4, 4], [255, 255, 255])

    frames = [Image.new("RGB", (10, 10), col) for col in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    g = clean_image(buf.getvalue())
    assert set(g.conversions) == {"converted_palette", "converted_multiframe", "converted_format"}
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(g.data)))[5, 5], [255, 0, 0])  # the first frame


def test_rejections_and_pillow_limit_is_restored():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageRejected) as e:
        clean_image(encode(rgb(size=(50, 50))), max_pixels=2000)
    assert e.value.reason == "decompression_bomb"
    assert Image.MAX_IMAGE_PIXELS == before
    # Pillow's own default (~89 Mpx) does not refuse what our limit allows: the limit is ours
    with pixel_limit(10):
        assert Image.MAX_IMAGE_PIXELS == 10
    assert Image.MAX_IMAGE_PIXELS == before
    for data, reason in [(b"", "not_an_image"), (b"GIF89a" + b"\x00" * 5, "corrupt"), (b"hello", "not_an_image")]:
        with pytest.raises(ImageRejected) as e:
            clean_image(data)
        assert e.value.reason == reason


def test_caption_rules():
    assert clean_caption(None, policy="drop", max_chars=10).drop_reason == "missing_caption"
    assert clean_caption(" \n", policy="drop", max_chars=10).drop_reason == "empty_caption"
    filled = clean_caption("", policy="filename", max_chars=50, filename="dir/a_big-dog.v2.jpg")
    assert (filled.caption, filled.fixes) == ("a big dog v2", ("caption_empty_filled",))
    assert caption_from_filename("x/IMG_0001.JPG") == "IMG 0001"
    raw = "naïve café ☕".encode() + b" \xff\xfe end"
    c = clean_caption(raw, policy="drop", max_chars=100)
    assert c.caption == "naïve café ☕ \ufffd\ufffd end" and c.fixes == ("caption_non_utf8",)
    t = clean_caption("abcdef ghij", policy="drop", max_chars=7)
    assert (t.caption, t.fixes) == ("abcdef", ("caption_truncated",))
    assert decode_text("\ufeffbom".encode("utf-8")) == "bom"
