"""Run-config validation refuses a pretrained stage 1 that cannot work before any asset runs, in one line each."""

import pytest

from pipeline.config_bridge import ConfigValidationError
from pipeline.validation import check_sections
from tests.tiny_autoencoders import save_tiny_autoencoder_kl


@pytest.fixture(scope="module")
def c16(tmp_path_factory):
    return save_tiny_autoencoder_kl(tmp_path_factory.mktemp("vae") / "c16", 16)


def _errors(vae: dict, ldm: dict | None = None) -> list[str]:
    ops = {"vae_model": {"config": vae}}
    if ldm is not None:
        ops["ldm_model"] = {"config": {"training": ldm}}
    try:
        check_sections({"ops": ops})
    except ConfigValidationError as e:
        return [line.strip() for line in str(e).splitlines()[1:]]
    return []


def test_a_readable_source_validates(c16):
    assert _errors({"pretrained": {"source": str(c16), "mode": "decoder"}}) == []


@pytest.mark.parametrize(
    "section, expected",
    [
        ({"mode": "encoder"}, "vae_model.pretrained.mode: Input should be 'frozen' or 'decoder'"),
        ({"latent_scale": "guess"}, "vae_model.pretrained.latent_scale: Input should be 'config' or 'measure'"),
    ],
)
def test_unknown_choices_are_refused(c16, section, expected):
    assert _errors({"pretrained": {"source": str(c16), **section}}) == [expected]


def test_a_model_or_a_trainable_set_against_the_source_is_refused(c16):
    errors = _errors(
        {
            "pretrained": {"source": str(c16), "mode": "decoder"},
            "training": {"model": {"preset": "tiny-vq"}, "trainer": {"trainable": "all"}},
        }
    )
    assert errors == [
        "vae_model.training.model: the autoencoder comes from vae_model.pretrained.source; leave it unset",
        "vae_model.training.trainer.trainable: 'all', but vae_model.pretrained.mode 'decoder' keeps the encoder "
        "fixed; leave it unset",
    ]


def test_a_source_that_is_not_a_kl_autoencoder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "VQModel"}')
    assert _errors({"pretrained": {"source": str(tmp_path), "mode": "decoder"}}) == [
        f"vae_model.pretrained.source: {tmp_path} holds a diffusers VQModel, not an AutoencoderKL; only a KL "
        "autoencoder can serve as stage 1"
    ]


def test_a_missing_local_source_is_refused(tmp_path):
    (error,) = _errors({"pretrained": {"source": str(tmp_path / "nope")}})
    assert error.startswith(f"vae_model.pretrained.source: pretrained source '{tmp_path / 'nope'}' not found")


def test_the_denoiser_is_checked_against_the_sources_latents(c16):
    # the 16-channel source decides the latent channels, not the run config's default autoencoder (4)
    errors = _errors({"pretrained": {"source": str(c16)}}, {"denoiser": {"preset": "tiny", "in_channels": 4}})
    assert errors == [
        "ldm_model.training.denoiser.in_channels: 4, but the autoencoder's latents have 16 channels "
        "(vae_model.training.model.z_channels); leave it unset"
    ]
