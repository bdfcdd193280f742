"""Decoder-only fine-tuning from given weights (`trainer.trainable: decoder`, `init_weights=`): the encoder and
quant_conv, so the latent space, stay bitwise fixed; the decoder learns; a resume is exact."""

import pydantic
import pytest
import torch

from ldm_core.data.memory import InMemoryDataset
from ldm_core.models.autoencoder import autoencoder_preset, build_autoencoder
from ldm_core.trainers.autoencoder import ENCODER_SIDE, AutoencoderTrainingConfig, train_autoencoder

MODEL = autoencoder_preset("tiny", ch=16, norm_groups=8)


def _images(n: int, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.interpolate(
        torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=(size, size), mode="bilinear", align_corners=False
    )


def _config(**trainer) -> AutoencoderTrainingConfig:
    return AutoencoderTrainingConfig.model_validate(
        {
            "model": MODEL.to_dict(),
            "discriminator": {"ndf": 8, "n_layers": 2, "norm": "actnorm"},
            "loss": {"disc_start": 2, "perceptual_weight": 0.0},
            "trainer": {
                "steps": 4,
                "batch_size": 4,
                "lr": 1e-3,
                "checkpoint_every": 2,
                "log_every": 1,
                "trainable": "decoder",
                "ema_decay": 0.9,
                "seed": 3,
                **trainer,
            },
        }
    )


@pytest.fixture(scope="module")
def pretrained() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)  # not the trainer's seed: the start is visibly the given weights, not its own init
    return {k: v.clone() for k, v in build_autoencoder(MODEL).state_dict().items()}


def _encoder_side(key: str) -> bool:
    return key.split(".")[0] in ENCODER_SIDE


def test_decoder_only_training_leaves_the_encoder_bitwise_and_changes_the_decoder(pretrained):
    result = train_autoencoder(_config(), InMemoryDataset(image=_images(8)), perceptual=None, init_weights=pretrained)
    after = result.model.state_dict()  # the EMA's weights, what is exported
    assert any(_encoder_side(k) for k in after) and any(k.startswith("post_quant_conv") for k in after)
    for k, v in after.items():
        if _encoder_side(k):
            assert torch.equal(v, pretrained[k]), f"{k} changed"
        else:
            assert not torch.equal(v, pretrained[k]), f"{k} did not train"


def test_decoder_only_training_resumes_exactly(pretrained, tmp_path):
    data = InMemoryDataset(image=_images(8))
    full = train_autoencoder(
        _config(), data, checkpoint_dir=str(tmp_path / "a"), perceptual=None, init_weights=pretrained
    )
    part = train_autoencoder(
        _config(),
        data,
        checkpoint_dir=str(tmp_path / "b"),
        perceptual=None,
        init_weights=pretrained,
        should_stop=lambda step: step == 2,
    )
    assert not part.finished
    # the resume's own starting weights lose to the checkpoint's
    resumed = train_autoencoder(
        _config(),
        data,
        checkpoint_dir=str(tmp_path / "b"),
        perceptual=None,
        init_weights={k: torch.zeros_like(v) for k, v in pretrained.items()},
    )
    assert resumed.resumed_from == 2
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_init_weights_that_do_not_fit_are_refused_in_one_line(pretrained):
    wrong = {**pretrained, "quant_conv.weight": torch.zeros(4, 4, 1, 1)}
    with pytest.raises(ValueError) as e:
        train_autoencoder(_config(), InMemoryDataset(image=_images(4)), perceptual=None, init_weights=wrong)
    assert str(e.value) == (
        "init weights: quant_conv.weight has shape (4, 4, 1, 1), the configured autoencoder's is (8, 8, 1, 1)"
    )


def test_decoder_only_needs_a_kl_autoencoder():
    with pytest.raises(pydantic.ValidationError, match="trainable 'decoder' keeps a KL autoencoder's latent space"):
        AutoencoderTrainingConfig.model_validate({"model": {"preset": "tiny-vq"}, "trainer": {"trainable": "decoder"}})
