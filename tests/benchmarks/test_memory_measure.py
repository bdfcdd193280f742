"""The memory benchmark's step peak: what the step adds, not the process's lifetime peak."""

import torch

from benchmarks.memory import step_peak_bytes


def test_step_peak_ignores_an_earlier_larger_peak():
    big = torch.ones(64 * 2**20)  # 256 MB touched, then freed: the process's lifetime peak is now ≥ 256 MB above
    del big

    def step() -> None:
        t = torch.ones(8 * 2**20)  # 32 MB
        assert float(t[-1]) == 1.0

    mb = step_peak_bytes(step) / 2**20
    # ru_maxrss (the old measure) would give the earlier peak: ≥ 256 MB
    assert 24 <= mb <= 128, mb
