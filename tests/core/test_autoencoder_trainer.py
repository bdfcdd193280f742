"""The stage-1 trainer: it learns, it resumes bit for bit, it guards against NaNs, it reports what it did."""

import math

import pytest
import torch

from ldm_core.checkpoint import CheckpointManager
from ldm_core.data.memory import InMemoryDataset
from ldm_core.models.autoencoder import autoencoder_preset
from ldm_core.tracking import RecordingTracker
from ldm_core.trainers.autoencoder import (
    AutoencoderTrainerConfig,
    AutoencoderTrainingConfig,
    measure_latent_scale,
    train_autoencoder,
)
from ldm_core.trainers.config import TrainerConfig
from ldm_core.trainers.step import NonFiniteLossError


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1] (low-frequency patterns an autoencoder can learn quickly)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def _config(**trainer) -> AutoencoderTrainingConfig:
    return AutoencoderTrainingConfig.model_validate(
        {
            "model": autoencoder_preset("tiny", ch=16, norm_groups=8).to_dict(),
            "discriminator": {"ndf": 8, "n_layers": 2, "norm": "actnorm"},
            "loss": {"disc_start": 2, "perceptual_weight": 0.0},
            "trainer": {"steps": 6, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 3, "log_every": 1, **trainer},
        }
    )


def _all_weights(result) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in result.model.state_dict().items()}


def test_overfitting_a_small_batch_lowers_reconstruction_loss():
    data = InMemoryDataset(image=_images(4))
    cfg = _config(steps=150, batch_size=4, log_every=5, checkpoint_every=1000)
    cfg.loss.disc_start = 10_000
    tracker = RecordingTracker()
    train_autoencoder(cfg, data, tracker, perceptual=None)
    rec = [v for _, v in tracker.metrics["rec"]]
    assert rec[-1] < rec[0] / 5, f"reconstruction L1 went {rec[0]:.4f} -> {rec[-1]:.4f}"


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    data = InMemoryDataset(image=_images(12))
    cfg = _config(steps=6, ema_decay=0.9, micro_batch_size=2)  # accumulation, EMA and the discriminator all active
    full = train_autoencoder(cfg, data, checkpoint_dir=str(tmp_path / "a"), perceptual=None)

    part = train_autoencoder(
        cfg, data, checkpoint_dir=str(tmp_path / "b"), perceptual=None, should_stop=lambda step: step == 4
    )
    assert not part.finished and part.step == 4
    resumed = train_autoencoder(cfg, data, checkpoint_dir=str(tmp_path / "b"), perceptual=None)
    assert resumed.resumed_from == 4 and resumed.step == 6

    a, b = _all_weights(full), _all_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # the discriminator and the optimizers resumed too: the final checkpoints agree bit for bit
    sa = CheckpointManager(str(tmp_path / "a")).load(6)
    sb = CheckpointManager(str(tmp_path / "b")).load(6)
    for key in ("loss", "model"):
        for k, v in sa[key].items():
            assert torch.equal(v, sb[key][k]), f"{key}.{k}"
    for pid, st in sa["opt_d"]["state"].items():
        assert torch.equal(st["exp_avg"], sb["opt_d"]["state"][pid]["exp_avg"])
    assert sa["position"] == sb["position"]


def test_discriminator_does_not_train_before_disc_start(tmp_path):
    data = InMemoryDataset(image=_images(8))
    cfg = _config(steps=2, checkpoint_every=2)
    cfg.loss.disc_start = 100
    train_autoencoder(cfg, data, checkpoint_dir=str(tmp_path), perceptual=None)
    state = CheckpointManager(str(tmp_path)).load(2)
    assert state["opt_d"]["state"] == {}, "the discriminator optimizer stepped before disc_start"


def test_nonfinite_batches_are_skipped_and_counted_then_stop_the_run(tmp_path):
    imgs = _images(8)
    imgs[3, 0, 0, 0] = float("nan")
    data = InMemoryDataset(image=imgs)
    cfg = _config(steps=4, batch_size=4)
    tracker = RecordingTracker()
    result = train_autoencoder(cfg, data, tracker, checkpoint_dir=str(tmp_path / "ok"), perceptual=None)
    # 2 batches per epoch, the NaN image is in exactly one of them each epoch: 2 of 4 steps skipped
    assert result.nonfinite_skipped == 2
    assert tracker.last("nonfinite_skipped") == 2
    for v in result.model.state_dict().values():
        assert torch.isfinite(v).all()

    all_nan = InMemoryDataset(image=torch.full((8, 3, 16, 16), float("nan")))
    cfg = _config(steps=10, batch_size=4, max_nonfinite_steps=2, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match="3 steps"):
        train_autoencoder(cfg, all_nan, checkpoint_dir=str(tmp_path / "bad"), perceptual=None)


def test_tracker_receives_params_terms_and_the_perceptual_flag():
    tracker = RecordingTracker()
    train_autoencoder(_config(steps=3), InMemoryDataset(image=_images(8)), tracker, perceptual=None)
    assert tracker.params["perceptual_used"] is False and tracker.tags["perceptual_used"] == "false"
    assert tracker.params["model.z_channels"] == 4 and tracker.params["loss.kl_weight"] == 1e-6
    for term in ("rec", "nll", "kl", "g", "d_weight", "d_loss", "logits_real", "logits_fake", "total"):
        assert term in tracker.metrics, term
    # before disc_start (step index < 2) the GAN terms are zero; after, the discriminator acts
    assert tracker.metrics["g"][0][1] == 0.0 and tracker.metrics["d_weight"][0][1] == 0.0
    assert tracker.metrics["d_loss"][-1][1] > 0.0
    assert any(name == "reconstructions" for name, _, _ in tracker.images)
    assert 0 < tracker.last("mfu") < 1


def test_vq_variant_trains_with_the_same_trainer():
    cfg = _config(steps=3)
    cfg.model = autoencoder_preset("tiny-vq", ch=16, norm_groups=8, n_embed=32)
    tracker = RecordingTracker()
    train_autoencoder(cfg, InMemoryDataset(image=_images(8)), tracker, perceptual=None)
    assert "codebook" in tracker.metrics and "perplexity" in tracker.metrics
    assert 0 < tracker.last("codebook_usage") <= 1


def test_latent_scale_gives_unit_std():
    torch.manual_seed(0)
    from ldm_core.models.autoencoder import build_autoencoder

    model = build_autoencoder(autoencoder_preset("tiny"))
    data = InMemoryDataset(image=_images(16, size=32))
    scale, shift = measure_latent_scale(model, data, batch_size=8)
    assert shift == 0.0 and scale > 0
    with torch.no_grad():
        z = model.encode(data.get_batch(range(16))).sample(torch.Generator().manual_seed(0))
    assert (z * scale).std().item() == pytest.approx(1.0, rel=0.05)
    scale2, shift2 = measure_latent_scale(model, data, batch_size=8, use_shift=True)
    assert ((z - shift2) * scale2).mean().item() == pytest.approx(0.0, abs=0.05)
    assert math.isclose(scale, scale2, rel_tol=1e-9)


def test_the_autoencoder_does_not_clip_by_default_because_its_gradient_norm_is_far_above_one():
    # the shared trainer default clips at 1.0 (right for the denoiser's mean loss); the summed nll's norm is far above
    # it from the first step, so that default would clip every step: the autoencoder's own default is no clip
    assert TrainerConfig().grad_clip == 1.0
    assert AutoencoderTrainerConfig().grad_clip is None
    cfg = AutoencoderTrainingConfig.model_validate(
        {
            "model": autoencoder_preset("tiny", ch=16, norm_groups=8).to_dict(),
            "discriminator": {"ndf": 8, "n_layers": 2},
            "loss": {"perceptual_weight": 0.0},
            "trainer": {"steps": 2, "batch_size": 4, "log_every": 1},
        }
    )
    tracker = RecordingTracker()
    train_autoencoder(cfg, InMemoryDataset(image=_images(4)), tracker, perceptual=None)
    assert min(v for _, v in tracker.metrics["grad_norm"]) > 10.0


def test_fp16_scales_the_loss_so_small_gradients_do_not_underflow():
    # logvar 16: the nll's gradient per pixel, e^-16 / batch ≈ 3e-8, is below fp16's smallest subnormal (6e-8), so an
    # unscaled fp16 backward flushes it to zero where the decoder's output meets the loss, and nothing learns
    data = InMemoryDataset(image=_images(4))
    cfg = _config(steps=10, batch_size=4, log_every=1, checkpoint_every=1000, precision="fp16")
    cfg.loss.disc_start = 10_000
    cfg.loss.logvar_init = 16.0
    tracker = RecordingTracker()
    result = train_autoencoder(cfg, data, tracker, perceptual=None)
    rec = [v for _, v in tracker.metrics["rec"]]
    assert rec[-1] < 0.8 * rec[0], f"reconstruction L1 went {rec[0]:.4f} -> {rec[-1]:.4f}"
    assert result.nonfinite_skipped == 0


def test_fp16_resumes_its_loss_scales_exactly_and_does_not_count_overflow_skips(tmp_path):
    data = InMemoryDataset(image=_images(8))
    cfg = _config(steps=4, checkpoint_every=2, precision="fp16", max_nonfinite_steps=0)  # the GAN from step 2
    full = train_autoencoder(cfg, data, checkpoint_dir=str(tmp_path / "a"), perceptual=None)
    train_autoencoder(
        cfg, data, checkpoint_dir=str(tmp_path / "b"), perceptual=None, should_stop=lambda step: step == 2
    )
    at_2 = CheckpointManager(str(tmp_path / "b")).load(2)
    # the first steps overflowed at the initial scale and were skipped as the scaler backed off: that is no failure
    assert at_2["scaler_g"]["scale"] < torch.amp.GradScaler("cpu").get_scale()
    assert full.nonfinite_skipped == 0 and at_2["nonfinite_skipped"] == 0
    resumed = train_autoencoder(cfg, data, checkpoint_dir=str(tmp_path / "b"), perceptual=None)
    assert resumed.resumed_from == 2
    a, b = _all_weights(full), _all_weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    sa, sb = CheckpointManager(str(tmp_path / "a")).load(4), CheckpointManager(str(tmp_path / "b")).load(4)
    assert sa["scaler_g"] == sb["scaler_g"] and sa["scaler_d"] == sb["scaler_d"]
