"""Sharded training (strategy fsdp, FSDP2 on gloo): 2 processes take the steps of 1, resume bit for bit, and their
sharded (DCP) checkpoints resume on 1 and on 4 processes.

The runs train the tiny UNet and a tiny MMDiT with every random part on (caption dropout, timesteps, noise, EMA,
warmup), in fp32. "Equal up to float noise" is the bound derived in tests/core/test_distributed_training.py: the
runs sum the same gradients in another order (here also through a reduce-scatter, and accumulated over two global
micro-batches of 2 rows: 1 row per process there, 2 rows in the 1-process run), so at most a few elements in 10⁴
may end more than 1% of lr·steps apart, while a real divergence moves most of them. The planted defect is a rank
that drops its shard's reduced gradient before the optimizer step; the comparison must see it.

Processes are spawned (torch.multiprocessing, gloo on loopback); the 1-process runs are in the test process.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp

from ldm_core import distributed
from ldm_core.checkpoint import CheckpointManager
from ldm_core.data.memory import InMemoryDataset
from ldm_core.models.denoiser import build_denoiser
from ldm_core.models.mmdit import MMDIT_PRESETS
from ldm_core.models.unet import UNET_PRESETS
from ldm_core.sharded_checkpoint import ShardedCheckpointManager
from ldm_core.trainers import ldm as ldm_trainer
from ldm_core.trainers.ldm import LDMTrainingConfig, train_ldm
from tests.common import free_port
from tests.core.test_distributed_training import LR, MAX_MOVED_FRACTION, STEPS, STOP_AT, _diffs, _moved_fraction

KINDS = ("unet", "mmdit")
PARTS = ("model", "ema")


def _setup(
    kind: str, micro: int | None = None, strategy: str = "fsdp", precision: str = "fp32", checkpointing: bool = False
):
    g = torch.Generator().manual_seed(1)
    n, width = 16, 32
    data = {
        "latents": torch.randn(n, 4, 8, 8, generator=g),
        "context": torch.randn(n, 8, width, generator=g),
        "context_mask": torch.rand(n, 8, generator=g) > 0.3,
        "pooled": torch.randn(n, width, generator=g),
    }
    data["context_mask"][:, 0] = True
    if kind == "unet":
        denoiser = {**UNET_PRESETS["tiny"].to_dict(), "context_dim": width}
    else:
        denoiser = {**MMDIT_PRESETS["tiny"].to_dict(), "context_dim": width, "hidden_size": 64, "depth": 2}
    cfg = LDMTrainingConfig.model_validate(
        {
            "denoiser": denoiser,
            "diffusion": {"kind": "ddpm", "prediction": "v", "min_snr_gamma": 5.0},
            "trainer": {
                "steps": STEPS,
                "batch_size": 4,
                "micro_batch_size": micro,
                "lr": LR,
                "checkpoint_every": STOP_AT,
                "log_every": 1,
                "ema_decay": 0.9,
                "cond_dropout": 0.5,
                "warmup_steps": 1,
                "strategy": strategy,
                "precision": precision,
                "gradient_checkpointing": checkpointing,
            },
        }
    )
    uncond = (torch.zeros(1, 8, width), torch.ones(1, 8, dtype=torch.bool), torch.zeros(1, width))
    return cfg, InMemoryDataset(**data), uncond


def _train(kind: str, ckpt_dir: str | Path, should_stop=None, **setup):
    cfg, data, uncond = _setup(kind, **setup)
    return train_ldm(cfg, data, uncond=uncond, checkpoint_dir=str(ckpt_dir), should_stop=should_stop)


def _drop_own_shard_gradients(grad_norm_and_finite):
    """The planted defect: rank 1 zeroes its shard's reduced gradient before clipping and the optimizer step."""

    def planted(params, max_norm):
        if distributed.current().rank == 1:
            for p in params:
                if p.grad is not None:
                    p.grad.zero_()
        return grad_norm_and_finite(params, max_norm)

    return planted


def _worker(rank: int, world: int, port: int, out: str, plan: str) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    with distributed.distributed_session("gloo"):
        for kind in KINDS:
            d = Path(out) / kind
            if plan == "four":  # the 2-process checkpoint of step STOP_AT, resumed on 4 processes
                result = _train(kind, d / "four")
                if rank == 0:
                    torch.save({"resumed_from": result.resumed_from}, d / "four.pt")
                continue
            full = _train(kind, d / "full_acc", micro=1)
            _train(kind, d / "full")
            part = _train(kind, d / "resumed", should_stop=lambda step: step == STOP_AT)
            if rank == 0:
                for copy_to in ("at_stop", "four"):
                    shutil.copytree(d / "resumed", d / copy_to)
            distributed.barrier()
            resumed = _train(kind, d / "resumed")
            with mock.patch.object(
                ldm_trainer, "grad_norm_and_finite", _drop_own_shard_gradients(ldm_trainer.grad_norm_and_finite)
            ):
                _train(kind, d / "planted", micro=1)
            bf16 = _train(kind, d / "bf16", precision="bf16")
            _train(kind, d / "recomputed", checkpointing=True)
            torch.save(_held_elements(kind), d / f"held_rank{rank}.pt")
            if rank == 0:
                torch.save(
                    {
                        "history": full.history,
                        "exported": full.model.state_dict(),
                        "stopped_at": part.step,
                        "resumed_from": resumed.resumed_from,
                        "bf16_loss": [v for _, v in bf16.history["loss"]],
                    },
                    d / "rank0.pt",
                )
            else:
                assert full.model is None  # the whole model is gathered on rank 0 alone


def _held_elements(kind: str) -> dict[str, int]:
    """How many elements of the weights, the EMA and AdamW's moments this rank holds after one sharded step, and
    the whole model's parameter count."""
    from ldm_core.fsdp import OptimizerState, ShardedEMA, local, shard_model
    from ldm_core.trainers.step import make_adam

    cfg, _, _ = _setup(kind)
    torch.manual_seed(0)
    model = shard_model(build_denoiser(cfg.denoiser))
    ema, opt = ShardedEMA(model, 0.9), make_adam(list(model.parameters()), torch.device("cpu"), adamw=True)
    moments = OptimizerState(model, opt).state_dict()["state"]  # initialized, as a step leaves them
    return {
        "whole": sum(p.numel() for p in build_denoiser(cfg.denoiser).parameters()),
        "weights": sum(local(p).numel() for p in model.parameters()),
        "ema": sum(local(t).numel() for t in ema.params.values()),
        "moments": sum(local(t).numel() for m in moments.values() for k, t in m.items() if k != "step"),
    }


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> Path:
    """The 2-process runs, then the 4-process resume of their step-STOP_AT checkpoint (two spawns)."""
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(2, free_port(), str(out), "two"), nprocs=2, join=True)
    mp.spawn(_worker, args=(4, free_port(), str(out), "four"), nprocs=4, join=True)
    return out


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _final_sharded(ckpt_dir: Path, kind: str) -> dict:
    """The newest sharded checkpoint's weights and EMA, loaded whole into one process."""
    cfg, _, _ = _setup(kind)
    model = build_denoiser(cfg.denoiser)
    template = {"model": model.state_dict(), "ema": copy.deepcopy(model).state_dict()}
    step, state = ShardedCheckpointManager(str(ckpt_dir)).load_latest(template)
    assert step == STEPS
    return state


def _final_single(ckpt_dir: Path) -> dict:
    return CheckpointManager(str(ckpt_dir)).load(STEPS)


def _report(what: str, fraction: float, abs_diff: float) -> None:
    print(f"{what}: {fraction:.2g} of the elements more than 1% of lr·steps apart, max |diff| {abs_diff:.3g}")


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_two_fsdp_processes_take_the_steps_of_one_process(fsdp_runs, tmp_path, one_thread, kind):
    # the same global micro-batches (2 rows), so the same draws: 2 of 1 row each on 2 processes, 2 rows here
    single = _train(kind, tmp_path / "single", micro=2, strategy="ddp")
    one, two = _final_single(tmp_path / "single"), _final_sharded(fsdp_runs / kind / "full_acc", kind)
    fraction, abs_diff = _moved_fraction(one, two, PARTS)
    _report(f"{kind}: 1 process (ddp) vs 2 (fsdp)", fraction, abs_diff)
    assert fraction <= MAX_MOVED_FRACTION
    rank0 = torch.load(fsdp_runs / kind / "rank0.pt")
    assert [s for s, _ in rank0["history"]["loss"]] == list(range(1, STEPS + 1))
    for (_, v1), (_, v2) in zip(single.history["loss"], rank0["history"]["loss"]):
        assert v1 == pytest.approx(v2, rel=1e-5, abs=1e-6)
    # what rank 0 hands on (gathered from the shards) is the checkpoint's EMA, bit for bit
    for k, v in rank0["exported"].items():
        assert torch.equal(v, two["ema"][k]), k


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_the_comparison_sees_a_rank_that_drops_its_shard_gradient(fsdp_runs, kind):
    fraction, _ = _moved_fraction(
        _final_sharded(fsdp_runs / kind / "full_acc", kind), _final_sharded(fsdp_runs / kind / "planted", kind), PARTS
    )
    print(f"{kind}: planted defect moved {fraction:.2g} of the elements")
    # the MMDiT starts adaLN-Zero (zero gates and output layer): in 4 steps only a few percent of its elements get a
    # gradient at all (measured: 7.7% moved by the plant, the UNet 78%), so the bar is 10x the noise bound
    assert fraction > 10 * MAX_MOVED_FRACTION


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_an_fsdp_run_killed_and_resumed_equals_the_uninterrupted_run_bit_for_bit(fsdp_runs, kind):
    rank0 = torch.load(fsdp_runs / kind / "rank0.pt")
    assert rank0["stopped_at"] == STOP_AT and rank0["resumed_from"] == STOP_AT
    full, resumed = _final_sharded(fsdp_runs / kind / "full", kind), _final_sharded(fsdp_runs / kind / "resumed", kind)
    assert _diffs(full, resumed, PARTS) == 0.0
    assert full["position"] == resumed["position"] and full["step"] == resumed["step"] == STEPS


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_two_process_sharded_checkpoint_resumes_on_one_process(fsdp_runs, tmp_path, one_thread, kind):
    shutil.copytree(fsdp_runs / kind / "at_stop", tmp_path / "one")
    result = _train(kind, tmp_path / "one")  # strategy fsdp on one process: unsharded, the same DCP checkpoints
    assert result.resumed_from == STOP_AT
    fraction, abs_diff = _moved_fraction(
        _final_sharded(fsdp_runs / kind / "full", kind), _final_sharded(tmp_path / "one", kind), PARTS
    )
    _report(f"{kind}: 2 processes vs resumed on 1", fraction, abs_diff)
    assert fraction <= MAX_MOVED_FRACTION


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_two_process_sharded_checkpoint_resumes_on_four_processes(fsdp_runs, kind):
    assert torch.load(fsdp_runs / kind / "four.pt")["resumed_from"] == STOP_AT
    fraction, abs_diff = _moved_fraction(
        _final_sharded(fsdp_runs / kind / "full", kind), _final_sharded(fsdp_runs / kind / "four", kind), PARTS
    )
    _report(f"{kind}: 2 processes vs resumed on 4", fraction, abs_diff)
    assert fraction <= MAX_MOVED_FRACTION


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_mixed_precision_trains_under_fsdp(fsdp_runs, kind):
    losses = torch.load(fsdp_runs / kind / "rank0.pt")["bf16_loss"]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_activation_checkpointing_composes_with_fsdp(fsdp_runs, kind):
    """Recomputing each block in the backward pass (gathering it once more) changes no value."""
    fraction, abs_diff = _moved_fraction(
        _final_sharded(fsdp_runs / kind / "full", kind), _final_sharded(fsdp_runs / kind / "recomputed", kind), PARTS
    )
    _report(f"{kind}: with and without activation checkpointing", fraction, abs_diff)
    assert fraction <= MAX_MOVED_FRACTION


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_each_rank_holds_half_of_the_weights_ema_and_moments(fsdp_runs, kind):
    """Sharded over 2: each rank's weights, EMA and both AdamW moments are its half of every tensor (dim 0, the
    first rank's part rounded up: at most one row of each tensor more than half)."""
    held = [torch.load(fsdp_runs / kind / f"held_rank{r}.pt") for r in range(2)]
    whole = held[0]["whole"]
    for part, copies in (("weights", 1), ("ema", 1), ("moments", 2)):
        total = sum(h[part] for h in held)
        assert total == copies * whole, (part, total, whole)
        for h in held:
            assert h[part] <= copies * whole * 0.55, (part, h[part], whole)
