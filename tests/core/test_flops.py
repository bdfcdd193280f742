import pytest
import torch

from ldm_core.flops import count_flops, measure_matmul_peak, mfu


def test_counts_a_linear_layer_forward_and_backward_exactly():
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    assert count_flops(lambda: lin(x)) == 2 * 8 * 64 * 32
    # backward: grad wrt input and wrt weight, each another matmul of the same size
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 8 * 64 * 32


def test_counts_a_convolution():
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 16, 16)
    assert count_flops(lambda: conv(x)) == 2 * 2 * 16 * 16 * 8 * 4 * 9


def test_matmul_peak_is_a_plausible_rate():
    rate = measure_matmul_peak(torch.float32, n=256, seconds=0.05)
    assert 1e8 < rate < 1e15


def test_mfu_formula():
    assert mfu(2e9, 50.0, 200e9) == pytest.approx(0.5)
    assert mfu(2e9, 50.0, None) is None
