"""Numerical faults: once the data turns to NaN for good, the trainers skip and count the bad steps, then stop; the
newest checkpoint is the last good state (it verifies, is finite, and the skipped step changed nothing in it), and
a resume on clean data carries on from it with the count restored."""

import pytest
import torch

from benchmarks.faults import runner
from benchmarks.faults.injectors import PoisonedAfter
from ldm_core.checkpoint import CheckpointManager
from ldm_core.trainers.step import NonFiniteLossError


@pytest.mark.parametrize("job", ["ae", "ldm"])
def test_repeated_nans_stop_the_run_with_the_last_good_checkpoint_intact(job, tmp_path):
    # 2 micro-batches per step: steps 1-4 see clean data, every step after sees NaN
    poisoned = PoisonedAfter(runner.clean_data(job), good_batches=8)
    with pytest.raises(NonFiniteLossError, match="2 steps"):
        runner.train(job, poisoned, tmp_path, steps=10, max_nonfinite=1)

    mgr = CheckpointManager(str(tmp_path))
    assert mgr.steps() == [4, 5]  # step 5 was skipped (and checkpointed), step 6 stopped the run before its save
    step, last = mgr.load_latest()  # verifies the checksum
    good = mgr.load(4)
    assert step == 5 and last["nonfinite_skipped"] == 1
    for part in ("model", "ema"):
        for k, v in last[part].items():
            assert torch.isfinite(v).all(), f"{part}.{k} is not finite"
            assert torch.equal(v, good[part][k]), f"the skipped step changed {part}.{k}"

    resumed = runner.train(job, runner.clean_data(job), tmp_path, steps=7, max_nonfinite=1)
    assert resumed.resumed_from == 5 and resumed.step == 7 and resumed.nonfinite_skipped == 1
    assert all(torch.isfinite(v).all() for v in resumed.model.state_dict().values())
