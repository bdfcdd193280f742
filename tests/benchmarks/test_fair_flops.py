"""The benchmark rows count each side's FLOPs on its own step: equal where the work is equal, not where it is not."""

import pytest
import torch

from benchmarks import autoencoder as ae_bench
from benchmarks import mmdit as mmdit_bench
from benchmarks import unet as unet_bench
from ldm_core.flops import count_flops
from ldm_core.models.unet import UNet


def test_identical_architectures_count_identical_flops():
    unet = unet_bench.meta_flops(unet_bench.CONFIGS["demo"])
    mmdit = mmdit_bench.meta_flops(mmdit_bench.CONFIGS["tiny"])
    for flops in (unet["train"], unet["forward"], mmdit["train"], mmdit["forward"], ae_bench.fwd_bwd_flops(32)):
        assert flops["ours"] > 0 and flops["ours"] == pytest.approx(flops["diffusers"], rel=1e-6)
    # attention is counted: on the meta device; on CPU tensors torch's counter misses the flash-attention kernel
    spec = unet_bench.CONFIGS["demo"]
    model = UNet(spec["unet"])
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, spec["tokens"], spec["unet"].context_dim)
    assert unet["forward"]["ours"] > count_flops(lambda: model(x, torch.ones(2), ctx)) / 2


def test_the_reference_full_loss_step_is_counted_with_its_second_backward():
    flops = ae_bench.full_loss_flops(32)
    assert flops["diffusers"] > flops["ours"] > 0
