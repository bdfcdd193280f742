"""Stage 2 trainer: it learns text conditioning, resumes bit for bit, and feeds generate(); the MMDiT gets the pooled
text vectors (dropped with their captions), the UNet's steps do not change."""

import numpy as np
import pytest
import torch

from ldm_core.checkpoint import CheckpointManager
from ldm_core.data.memory import InMemoryDataset
from ldm_core.diffusion import DiffusionConfig, create_diffusion
from ldm_core.diffusion.guidance import cfg_model
from ldm_core.models.denoiser import parse_denoiser_config
from ldm_core.models.unet import UNET_PRESETS, UNetConfig
from ldm_core.text_encoder import TextEncoder, TextEncoderConfig
from ldm_core.tracking import RecordingTracker
from ldm_core.trainers.ldm import LDMTrainingConfig, train_ldm

PROMPTS = {"red": "a red square", "blue": "a blue square"}


@pytest.fixture(scope="module")
def text():
    enc = TextEncoder(TextEncoderConfig(max_length=8))
    embs = {k: enc.encode([p]) for k, p in PROMPTS.items()}
    return enc, embs


def _toy_latents(text_embs, n: int, seed: int = 0) -> InMemoryDataset:
    """Two classes: "red" latents have mean +1, "blue" mean −1 (per element), plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2  # 0 = red, 1 = blue
    sign = 1.0 - 2.0 * labels.float()
    lat = sign.view(n, 1, 1, 1) + 0.1 * torch.randn(n, 4, 8, 8, generator=g)
    red, blue = text_embs["red"], text_embs["blue"]
    ctx = torch.where(labels.view(n, 1, 1) == 0, red.embeddings, blue.embeddings)
    mask = torch.where(labels.view(n, 1) == 0, red.mask, blue.mask)
    return InMemoryDataset(latents=lat, context=ctx, context_mask=mask)


def _config(**trainer) -> LDMTrainingConfig:
    return LDMTrainingConfig.model_validate(
        {
            "denoiser": UNET_PRESETS["tiny"].to_dict(),
            "diffusion": {"kind": "flow", "sample_steps": 12},
            "trainer": {
                "steps": 6,
                "batch_size": 8,
                "lr": 1e-3,
                "checkpoint_every": 3,
                "log_every": 1,
                "ema_decay": None,
                "cond_dropout": 0.1,
                **trainer,
            },
        }
    )


def _class_accuracy(model, text_embs, enc, n_per_class=16, guidance=3.0) -> float:
    diffusion = create_diffusion(DiffusionConfig(kind="flow", sample_steps=12))
    empty = enc.empty()
    correct = 0
    for cls, sign in (("red", 1.0), ("blue", -1.0)):
        e = text_embs[cls]
        noise = torch.randn(n_per_class, 4, 8, 8, generator=torch.Generator().manual_seed(123))
        with torch.no_grad():
            z = diffusion.sample(
                cfg_model(model.eval(), e.embeddings, e.mask, empty.embeddings, empty.mask, guidance), noise
            )
        correct += int(((z.mean(dim=(1, 2, 3)) * sign) > 0).sum())
    return correct / (2 * n_per_class)


def test_tiny_unet_learns_the_prompt(text):
    enc, embs = text
    data = _toy_latents(embs, 64)
    # 400 steps: at 250 the outcome depends on rounding (1.0 with foreach AdamW, 0.78 with fused); at 400 both give 1.0
    cfg = _config(steps=400, batch_size=16, log_every=25, checkpoint_every=10_000, ema_decay=None)
    torch.manual_seed(0)
    from ldm_core.models.denoiser import build_denoiser

    untrained_acc = _class_accuracy(build_denoiser(cfg.denoiser), embs, enc)
    tracker = RecordingTracker()
    empty = enc.empty()
    result = train_ldm(cfg, data, tracker, uncond=(empty.embeddings, empty.mask))
    acc = _class_accuracy(result.model, embs, enc)
    losses = [v for _, v in tracker.metrics["loss"]]
    assert losses[-1] < losses[0]
    assert acc >= 0.85, f"class accuracy {acc:.2f} (untrained: {untrained_acc:.2f})"
    assert untrained_acc < 0.85, "the threshold must be one an untrained model fails"


@pytest.mark.parametrize("kind", ["flow", "ddpm"])
def test_resume_is_bitwise_equal(text, tmp_path, kind):
    enc, embs = text
    data = _toy_latents(embs, 24)
    cfg = _config(steps=5, ema_decay=0.9, micro_batch_size=4, warmup_steps=2)
    cfg.diffusion = DiffusionConfig(
        kind=kind, prediction="v" if kind == "ddpm" else "eps", min_snr_gamma=5.0 if kind == "ddpm" else None
    )
    empty = enc.empty()
    uncond = (empty.embeddings, empty.mask)
    full = train_ldm(cfg, data, uncond=uncond, checkpoint_dir=str(tmp_path / "a"))
    part = train_ldm(cfg, data, uncond=uncond, checkpoint_dir=str(tmp_path / "b"), should_stop=lambda s: s == 2)
    assert not part.finished
    resumed = train_ldm(cfg, data, uncond=uncond, checkpoint_dir=str(tmp_path / "b"))
    assert resumed.resumed_from == 2 and resumed.step == 5
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_fp16_resumes_its_loss_scale_exactly(text, tmp_path):
    # a narrow UNet: fp16 runs emulated on CPU, several times slower than fp32
    enc, embs = text
    cfg = _config(steps=2, batch_size=4, checkpoint_every=1, precision="fp16")
    cfg.denoiser = cfg.denoiser.model_copy(update={"model_channels": 16, "norm_groups": 4, "num_heads": 2})
    data, empty = _toy_latents(embs, 8), enc.empty()
    uncond = (empty.embeddings, empty.mask)
    full = train_ldm(cfg, data, uncond=uncond, checkpoint_dir=str(tmp_path / "a"))
    train_ldm(cfg, data, uncond=uncond, checkpoint_dir=str(tmp_path / "b"), should_stop=lambda s: s == 1)
    resumed = train_ldm(cfg, data, uncond=uncond, checkpoint_dir=str(tmp_path / "b"))
    assert resumed.resumed_from == 1
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    # the scale and its count of clean steps towards the next growth carry over the resume
    sa, sb = CheckpointManager(str(tmp_path / "a")).load(2), CheckpointManager(str(tmp_path / "b")).load(2)
    assert sa["scaler"] == sb["scaler"] and sa["scaler"]["_growth_tracker"] == 2


def test_nan_batch_is_skipped_and_counted(text):
    enc, embs = text
    data = _toy_latents(embs, 16)
    data.columns["latents"][0, 0, 0, 0] = float("nan")
    empty = enc.empty()
    tracker = RecordingTracker()
    res = train_ldm(_config(steps=4, batch_size=8), data, tracker, uncond=(empty.embeddings, empty.mask))
    assert res.nonfinite_skipped == 2  # one bad batch per epoch, two epochs
    assert all(torch.isfinite(v).all() for v in res.model.state_dict().values())


def test_sample_posterior_is_refused_with_a_dataset_that_does_not_draw(text):
    # the option lives in the trainer config (it changes what is trained on, and the checkpoint's config), the draws in
    # the dataset: a config asking for samples over fixed latents would silently train on the means
    enc, embs = text
    empty = enc.empty()
    with pytest.raises(ValueError, match="sample_posterior is True, but the latent dataset gives fixed latents"):
        train_ldm(_config(steps=1, sample_posterior=True), _toy_latents(embs, 8), uncond=(empty.embeddings, empty.mask))


def test_validation_samples_reach_the_tracker(text):
    enc, embs = text
    empty = enc.empty()
    calls = []

    def sample_fn(model, step):
        calls.append(step)
        return np.zeros((8, 8, 3), np.uint8)

    tracker = RecordingTracker()
    train_ldm(
        _config(steps=4, validation_every=2),
        _toy_latents(embs, 16),
        tracker,
        uncond=(empty.embeddings, empty.mask),
        sample_fn=sample_fn,
    )
    assert calls == [2, 4, 4] and [n for n, _, _ in tracker.images] == ["validation_samples"] * 3
    assert tracker.params["denoiser.kind"] == "unet" and "lr" in tracker.metrics
    # model FLOPs counted on meta tensors, MFU against this machine's measured matmul rate
    assert 0 < tracker.last("mfu") < 1 and tracker.last("model_tflops_per_device") > 0


def test_generate_is_deterministic_and_batch_independent(text):
    from ldm_core.generation import generate
    from ldm_core.grids import make_grid
    from ldm_core.models.autoencoder import autoencoder_preset, build_autoencoder
    from ldm_core.models.denoiser import build_denoiser

    enc, _ = text
    torch.manual_seed(0)
    vae = build_autoencoder(autoencoder_preset("tiny"))
    unet = build_denoiser(UNetConfig(**{**UNET_PRESETS["tiny"].to_dict()}))
    # zero-initialised outputs would make every prompt alike: perturb the weights
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    diffusion = create_diffusion(DiffusionConfig(kind="flow", sample_steps=4))
    kw = dict(vae=vae, denoiser=unet, text_encoder=enc, diffusion=diffusion, latent_shape=(4, 8, 8), guidance=2.0)
    a = generate(["a red square", "a blue circle", "a green triangle"], seed=7, batch_size=3, **kw)
    b = generate(["a red square", "a blue circle", "a green triangle"], seed=7, batch_size=1, **kw)
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # same images whatever the batching
    c = generate(["a red square"], seed=8, **kw)
    assert not np.array_equal(a[0], c[0])
    grid = make_grid(a, ncols=3)
    assert grid.shape == (2 + 34, 2 + 3 * 34, 3)


def test_torch_compile_option_trains_like_eager(text, monkeypatch):
    """trainer.compile=True runs the same steps through torch.compile: same losses (to rounding), same checkpoint
    format.

    The graphs are captured and differentiated by dynamo and AOTAutograd as in production, but lowered with the
    "aot_eager" backend: Inductor's C++ code generation is torch's to test and takes minutes on 2 CPU cores.
    """
    enc, embs = text
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, **{**kw, "backend": "aot_eager"}))
    empty = enc.empty()
    data = _toy_latents(embs, 16)
    tiny = {
        "model_channels": 8,
        "channel_mult": [1],
        "num_res_blocks": 1,
        "attention_levels": [0],
        "num_heads": 2,
        "context_dim": 384,
        "norm_groups": 4,
    }  # the smallest graph: compilation dominates this test
    results = {}
    for compiled in (False, True):
        cfg = _config(steps=2, batch_size=8, compile=compiled)
        cfg.denoiser = UNetConfig(**tiny)
        tracker = RecordingTracker()
        results[compiled] = (train_ldm(cfg, data, tracker, uncond=(empty.embeddings, empty.mask)), tracker)
    (eager, t_eager), (comp, t_comp) = results[False], results[True]
    for (s1, l1), (s2, l2) in zip(t_eager.metrics["loss"], t_comp.metrics["loss"]):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    assert eager.model.state_dict().keys() == comp.model.state_dict().keys()  # no "_orig_mod." prefixes
    for k, v in eager.model.state_dict().items():
        torch.testing.assert_close(v, comp.model.state_dict()[k], rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Pooled text vectors: the MMDiT's modulation gets them, the UNet's steps do not change
# ---------------------------------------------------------------------------------------------------------------

# 2 joint blocks of width 32 on 8x8x4 latents (16 patches), MiniLM tokens (384)
SMALL_MMDIT = {"kind": "mmdit", "preset": "tiny", "hidden_size": 32, "depth": 2, "num_heads": 2}


def _with_pooled(data: InMemoryDataset, pooled: torch.Tensor) -> InMemoryDataset:
    return InMemoryDataset(**data.columns, pooled=pooled)


def _mmdit_config(**trainer) -> LDMTrainingConfig:
    cfg = _config(**trainer)
    cfg.denoiser = parse_denoiser_config(SMALL_MMDIT)
    return cfg


def test_mmdit_learns_the_prompt_from_the_pooled_vector_alone(text):
    """Both classes get the same tokens; only the pooled vector (each prompt's own) tells them apart, so the model
    can learn the prompt only if the trainer hands it the batch's pooled vectors (left to pool the tokens itself it
    would see one prompt), and sampling only if generation hands it the prompt's."""
    enc, embs = text
    n = 64
    data = _toy_latents(embs, n)
    labels = torch.arange(n) % 2
    data.columns["context"][:] = embs["red"].embeddings
    data.columns["context_mask"][:] = embs["red"].mask
    data = _with_pooled(data, torch.where(labels[:, None] == 0, embs["red"].pooled, embs["blue"].pooled))
    cfg = _mmdit_config(steps=150, batch_size=16, log_every=25, checkpoint_every=10_000)
    empty = enc.empty()
    torch.manual_seed(0)
    result = train_ldm(cfg, data, uncond=(empty.embeddings, empty.mask, empty.pooled))

    diffusion = create_diffusion(DiffusionConfig(kind="flow", sample_steps=12))
    model = result.model.eval()
    correct = 0
    for cls, sign in (("red", 1.0), ("blue", -1.0)):
        noise = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(123))
        guided = cfg_model(
            model,
            embs["red"].embeddings,
            embs["red"].mask,
            empty.embeddings,
            empty.mask,
            3.0,
            pooled=embs[cls].pooled,
            uncond_pooled=empty.pooled,
        )
        with torch.no_grad():
            z = diffusion.sample(guided, noise)
        correct += int(((z.mean(dim=(1, 2, 3)) * sign) > 0).sum())
    assert correct / 32 >= 0.85, f"class accuracy {correct / 32:.2f}"


def test_caption_dropout_swaps_the_pooled_vector_with_the_tokens(text, monkeypatch):
    """Every forward sees, per row, the caption's tokens and its pooled vector, or the null caption's tokens and
    its pooled vector: never a dropped caption's pooled vector (which would leak the caption to the modulation).
    A pooled width unlike the tokens' (as SD3's) also has its FLOPs counted for MFU."""
    from ldm_core.models.mmdit import MMDiT

    enc, embs = text
    n, width = 32, 16
    g = torch.Generator().manual_seed(0)
    data = _with_pooled(_toy_latents(embs, n), torch.randn(n, width, generator=g) + 5.0)
    empty = enc.empty()
    upooled = torch.full((1, width), -5.0)
    seen = []
    forward = MMDiT.forward

    def spy(self, x, t, context, context_mask=None, pooled=None):
        if torch.is_grad_enabled():  # training steps (not the FLOP count on meta tensors)
            seen.append((context.detach().clone(), pooled.detach().clone()))
        return forward(self, x, t, context, context_mask, pooled)

    monkeypatch.setattr(MMDiT, "forward", spy)
    cfg = _mmdit_config(steps=4, batch_size=8, cond_dropout=0.5)
    cfg.denoiser = cfg.denoiser.model_copy(update={"pooled_projection_dim": width})
    tracker = RecordingTracker()
    train_ldm(cfg, data, tracker, uncond=(empty.embeddings, empty.mask, upooled))
    ctx_seen = [c for c, p in seen if not c.is_meta]
    pooled_seen = [p for c, p in seen if not c.is_meta]
    assert len(ctx_seen) == 4
    dropped_ctx = torch.cat([(c == empty.embeddings).all(dim=(1, 2)) for c in ctx_seen])  # (32,)
    dropped_pooled = torch.cat([(p == upooled).all(dim=1) for p in pooled_seen])
    assert 0 < dropped_ctx.sum() < len(dropped_ctx), "the test needs dropped and kept captions"
    assert torch.equal(dropped_ctx, dropped_pooled)
    assert all(((p > 0).all(1) | (p == upooled).all(1)).all() for p in pooled_seen)  # a kept row: its own vector
    assert 0 < tracker.last("mfu") < 1 and tracker.last("model_tflops_per_device") > 0


def test_unet_steps_are_unchanged_by_pooled_vectors(text):
    """The UNet takes no pooled vector: data and a null caption that carry one train it bit for bit as before."""
    enc, embs = text
    data = _toy_latents(embs, 16)
    empty = enc.empty()
    cfg = _config(steps=3, batch_size=8, cond_dropout=0.5)
    without = train_ldm(cfg, data, uncond=(empty.embeddings, empty.mask))
    pooled = torch.randn(16, 384, generator=torch.Generator().manual_seed(0))
    with_pooled = train_ldm(cfg, _with_pooled(data, pooled), uncond=(empty.embeddings, empty.mask, empty.pooled))
    for k, v in without.model.state_dict().items():
        assert torch.equal(v, with_pooled.model.state_dict()[k]), k


def test_mmdit_without_pooled_vectors_is_refused_with_what_to_do(text):
    enc, embs = text
    empty = enc.empty()
    data = _toy_latents(embs, 16)
    with pytest.raises(ValueError, match="null caption .*encode_dataset"):
        train_ldm(_mmdit_config(steps=1), data, uncond=(empty.embeddings, empty.mask))
    with pytest.raises(ValueError, match="no 'pooled'.*encode_dataset"):
        train_ldm(_mmdit_config(steps=1), data, uncond=(empty.embeddings, empty.mask, empty.pooled))
