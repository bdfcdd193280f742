"""Run-config validation reads a local diffusers folder named by ldm_model.init_from (its config, no weights) and
refuses one that cannot train on the configured latents and text encoder before any asset runs."""

import pytest

from pipeline.config_bridge import ConfigValidationError
from pipeline.validation import check_sections
from tests.core.tiny_models import tiny_diffusers_unet


def _errors(init_from: str, **ldm) -> list[str]:
    ops = {
        "vae_model": {"config": {"training": {"model": {"preset": "tiny"}}}},
        "latent_store": {"config": {"text_encoder": {"max_length": 8}}},
        "ldm_model": {"config": {"init_from": init_from, **ldm}},
    }
    try:
        check_sections({"ops": ops})
    except ConfigValidationError as e:
        return [line.strip() for line in str(e).splitlines()[1:]]
    return []


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("unets")
    tiny_diffusers_unet(cross_attention_dim=384).save_pretrained(root / "fits")
    tiny_diffusers_unet(cross_attention_dim=768).save_pretrained(root / "pipe" / "unet")
    return root


def test_a_folder_that_fits_validates(folders):
    assert _errors(str(folders / "fits")) == []


def test_a_folder_whose_text_width_differs_is_refused_naming_both_sides(folders):
    assert _errors(str(folders / "pipe"), init_subfolder="unet") == [
        "ldm_model.init_from: init_from has context_dim 768; the store's text encoder gives 384"
    ]


def test_what_only_the_asset_can_resolve_is_left_to_it(folders):
    for setting in ("auto", "none", "models:/ldm@champion", "s3://bucket/unet"):
        assert _errors(setting) == []
