"""A bundle carries its text encoder: the model and tokenizer are copied in, recorded by source and weights hash,
and loaded from the copy, so the bundle works after the encoder's original folder is gone."""

import json
import shutil

import pytest
import torch

from ldm_core.bundle import TEXT_ENCODER_DIR, load_text_to_image
from ldm_core.diffusion import DiffusionConfig
from ldm_core.text_encoder import TextEncoder, TextEncoderConfig, weights_sha256
from tests.core.tiny_models import tiny_bundle, tiny_clip

CAPTIONS = ["a photo", "a photo of a cat on a mat"]
FLOW = DiffusionConfig(kind="flow", sample_steps=2)


@pytest.mark.parametrize("with_projection", [True, False], ids=["clip-with-projection", "clip-plain"])
def test_the_bundle_works_after_the_source_folder_is_gone(tmp_path, with_projection):
    source = tmp_path / "clip"
    tiny_clip(source, with_projection)
    original = TextEncoder(TextEncoderConfig(name=str(source), max_length=8))
    expected = original.encode(CAPTIONS)
    url = tiny_bundle(str(tmp_path / "bundle"), original, FLOW)
    images = load_text_to_image(url).generate(CAPTIONS, steps=2)
    shutil.rmtree(source)

    loaded = load_text_to_image(url)
    enc = loaded.text_encoder
    # the same config (the source's name included) and the same pooling: the projection travelled with the copy
    assert enc.config == original.config and enc.pooling == original.pooling
    assert type(enc.model).__name__ == type(original.model).__name__
    out = enc.encode(CAPTIONS)
    for got, want in ((out.embeddings, expected.embeddings), (out.pooled, expected.pooled), (out.mask, expected.mask)):
        assert torch.equal(got, want)
    assert (loaded.generate(CAPTIONS, steps=2) == images).all()

    meta = json.loads((tmp_path / "bundle" / "bundle.json").read_text())["text_encoder_copy"]
    assert meta["source"] == str(source) and meta["revision"] is None
    assert meta["weights_sha256"] == weights_sha256(tmp_path / "bundle" / TEXT_ENCODER_DIR)


def test_a_copy_whose_weights_changed_is_refused(tmp_path):
    source = tmp_path / "clip"
    tiny_clip(source, with_projection=True)
    url = tiny_bundle(str(tmp_path / "bundle"), TextEncoder(TextEncoderConfig(name=str(source), max_length=8)), FLOW)
    weights = tmp_path / "bundle" / TEXT_ENCODER_DIR / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="text encoder weights hash"):
        load_text_to_image(url)


def test_a_bundle_written_before_the_copy_loads_its_encoder_by_name(tmp_path):
    """Bundles registered before this change have no text_encoder/ and no record of one: they load as before."""
    url = tiny_bundle(str(tmp_path / "bundle"), TextEncoder(TextEncoderConfig(max_length=8)), FLOW)
    meta_file = tmp_path / "bundle" / "bundle.json"
    meta = json.loads(meta_file.read_text())
    del meta["text_encoder_copy"]
    meta_file.write_text(json.dumps(meta))
    shutil.rmtree(tmp_path / "bundle" / TEXT_ENCODER_DIR)
    enc = load_text_to_image(url).text_encoder
    assert enc.config.name == "all-MiniLM-L6-v2" and enc.dim == 384
