"""The end-to-end benchmark: our side is `ldm_model`'s own loop and step, the reference does what
train_text_to_image.py does by default, and the epoch arithmetic counts the one-time encoding."""

import pytest
import torch

from benchmarks import end_to_end as e2e


def test_epoch_ratios_count_the_encoding_once():
    # 1 s per image cached, 3 s per image encoding every step, 4 s to encode an image once
    d = e2e.derive(s_ours=1.0, s_ref=3.0, e=4.0, steady=3.0)
    assert d["ratio_1_epoch"] == pytest.approx(3 / 5)  # 3 s against 4 + 1
    assert d["ratio_10_epochs"] == pytest.approx(30 / 14)
    assert d["break_even_epochs"] == pytest.approx(2.0)  # 4 + 2·1 == 2·3
    assert d["encode_in_ours_steps"] == pytest.approx(4.0)
    assert e2e.derive(s_ours=2.0, s_ref=1.5, e=1.0, steady=0.75)["break_even_epochs"] is None  # never pays


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    counts = e2e._write_inputs("demo", str(work))
    return str(work), counts


def test_ours_is_the_trainers_loop_with_its_per_step_work(demo_inputs):
    work, _ = demo_inputs
    step = e2e._ours(e2e.CONFIGS["demo"], work, torch.device("cpu"))
    prep = step.prepared
    tc = prep.step.tc
    assert tc.grad_clip == 1.0 and tc.cond_dropout == 0.1 and tc.ema_decay == 0.999  # the trainer's defaults
    step()
    step()
    assert prep.loop.step == 2  # TrainingLoop.run advanced: the loop itself ran, not a hand-written step
    assert prep.parts.opt.state  # the trainer's AdamW stepped
    ema = prep.parts.ema.model.state_dict()
    start = e2e.UNet(e2e.CONFIGS["demo"]["unet"]).state_dict()
    assert any(not torch.equal(ema[k], start[k]) for k in ema if ema[k].is_floating_point())


def test_the_reference_clips_and_passes_no_masks(demo_inputs, monkeypatch):
    from diffusers import UNet2DConditionModel

    work, _ = demo_inputs
    clips, unet_kwargs = [], []
    real_clip, real_forward = torch.nn.utils.clip_grad_norm_, UNet2DConditionModel.forward

    def clip(params, max_norm, *a, **k):
        clips.append(max_norm)
        return real_clip(params, max_norm, *a, **k)

    def forward(self, *a, **k):
        unet_kwargs.append(k)
        return real_forward(self, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    e2e._reference(e2e.CONFIGS["demo"], work, torch.device("cpu"))()
    assert clips == [1.0]  # train_text_to_image.py's max_grad_norm
    assert unet_kwargs and all(k.get("encoder_attention_mask") is None for k in unet_kwargs)


def test_the_label_names_every_model_and_its_size(demo_inputs):
    _, counts = demo_inputs
    row = {
        "config": "demo",
        "unet": e2e.CONFIGS["demo"]["unet"].to_dict(),
        "vae": "tiny",
        "resolution": 32,
        "text_encoder": e2e.MINILM,
        "tokens": 16,
        "batch": 32,
        **counts,
    }
    label = e2e.label(row)
    assert f"{counts['unet_parameters'] / 1e6:.1f}M" in label and f"{counts['vae_parameters'] / 1e6:.1f}M" in label
    assert "MiniLM" in label and "32 px" in label


def test_the_lora_sides_train_only_their_adapters_through_the_same_loops(demo_inputs, monkeypatch):
    work, counts = demo_inputs
    spec = e2e.CONFIGS["demo"]
    ours = e2e._ours(spec, work, torch.device("cpu"), lora_rank=4)
    assert ours.prepared.parts.lora
    assert 0 < ours.trainable < counts["unet_parameters"] / 10  # the adapter, not the UNet
    ours()
    assert ours.prepared.loop.step == 1
    clipped = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils,
        "clip_grad_norm_",
        lambda params, n, *a, **k: clipped.append(list(params)) or real_clip(params, n),
    )
    ref = e2e._reference(spec, work, torch.device("cpu"), lora_rank=4)
    assert 0 < ref.trainable < counts["unet_diffusers_parameters"] / 10
    ref()
    assert clipped and sum(p.numel() for p in clipped[0]) == ref.trainable  # the script clips the adapter only
