"""diffusers gets what its own pipelines pass: no encoder_attention_mask where no token is padded (an all-ones mask
sends every cross-attention of diffusers' UNet down its masked path)."""

import torch
from diffusers import UNet2DConditionModel

from benchmarks import unet as unet_bench


def _recording(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    forward = UNet2DConditionModel.forward

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    return calls


def _masked(calls: list[dict]) -> list[dict]:
    return [c for c in calls if c.get("encoder_attention_mask") is not None]


def test_diffusers_gets_no_mask_when_nothing_is_padded(monkeypatch):
    calls = _recording(monkeypatch)
    su = unet_bench.setup("demo", torch.device("cpu"))
    assert bool(su.mask.all())
    su.forward("diffusers")()  # the train step's forward (and compile.py's)
    unet_bench.run("demo", rounds=1, iters=1, sample_steps=2)  # train, as shipped, sampling
    unet_bench.meta_flops(unet_bench.CONFIGS["demo"])  # FLOPs on each side's own step
    assert len(calls) > 10
    assert _masked(calls) == []


def test_a_padded_batch_still_reaches_diffusers_with_its_mask(monkeypatch):
    calls = _recording(monkeypatch)
    su = unet_bench.setup("demo", torch.device("cpu"))
    su.mask[:, -3:] = False  # padded tokens: now the mask matters
    su.forward("diffusers")()
    assert len(_masked(calls)) == 1
