"""Data-parallel training: 2 gloo processes on CPU take the same steps as 1 process with the same global batch.

Both trainers run on tiny models with every random part switched on (posterior sampling, the discriminator from step
1 with ActNorm and the adaptive weight; caption dropout, random timesteps and noise, EMA). The 2-process runs are
spawned (torch.multiprocessing, gloo on loopback), the 1-process reference runs in the test process; the final
checkpoints (weights, discriminator, EMA) must agree up to float noise, and a 2-process run interrupted and resumed
must equal the uninterrupted 2-process run bit for bit.

What "up to float noise" means, derived rather than copied from one machine: the two runs sum the same gradients in
a different order (a batch of 4 vs two of 2 and an all-reduce), so each gradient differs by rounding. Adam divides a
gradient by its own running scale, so for an element whose gradient is far from zero the rounding moves its update
by a relative ~1e-6; for an element whose gradient is within rounding of zero, the sign of the noise decides its
step, and it may land up to 2·lr per step away. Two kinds of element are near zero:
- the attention key biases: softmax(q·(k + b)) = softmax(q·k + q·b), and q·b is the same for every key, so their
  exact gradient is 0 and they carry noise alone (a test shows they do not change the output);
- a handful of others with near-cancelling gradients.
So float noise is: at most a few elements in 10⁴ more than 1% of lr·steps apart. A real divergence (a rank that
draws its own noise, a per-rank ActNorm init, an adaptive weight from one rank's gradients) moves most elements by
O(lr): the planted-defect test below runs one and sees it. Measured on two thread counts of the 1-process run (the
workers use one): ≤ 3e-5 of the elements past 1% of lr·steps (AE and LDM), against the bound 1e-3.
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp

from ldm_core import distributed
from ldm_core.checkpoint import CheckpointManager
from ldm_core.data.memory import InMemoryDataset
from ldm_core.distributed import BatchShard
from ldm_core.models.autoencoder import autoencoder_preset, build_autoencoder
from ldm_core.models.discriminator import DiscriminatorConfig, NLayerDiscriminator
from ldm_core.models.unet import UNET_PRESETS
from ldm_core.trainers.autoencoder import AutoencoderTrainingConfig, init_actnorm_from_global_batch, train_autoencoder
from ldm_core.trainers.ldm import LDMTrainingConfig, train_ldm
from ldm_core.trainers.run_setup import split_global_batch
from tests.common import free_port

STEPS, STOP_AT, LR = 4, 2, 1e-4
MOVED = 0.01 * LR * STEPS  # an element this far apart took a step the other run did not take
MAX_MOVED_FRACTION = 1e-3  # float noise: a few elements in 10^4 (see the docstring); a divergence: most of them
KINDS = ("ae", "ldm")


# ---------------------------------------------------------------------------------------------------------------
# The two runs (identical in the test process and in the spawned workers)
# ---------------------------------------------------------------------------------------------------------------


def _ae_setup():
    g = torch.Generator().manual_seed(0)
    low = torch.rand(16, 3, 4, 4, generator=g) * 2 - 1
    images = torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    cfg = AutoencoderTrainingConfig.model_validate(
        {
            "model": autoencoder_preset("tiny", ch=16, norm_groups=8).to_dict(),
            "discriminator": {"ndf": 8, "n_layers": 2, "norm": "actnorm"},
            "loss": {"disc_start": 1, "perceptual_weight": 0.0},
            "trainer": {
                "steps": STEPS,
                "batch_size": 4,
                "lr": LR,
                "checkpoint_every": STOP_AT,
                "log_every": 1,
                "ema_decay": 0.9,
            },
        }
    )
    return cfg, InMemoryDataset(image=images)


def _ldm_setup():
    g = torch.Generator().manual_seed(1)
    n = 16
    latents = torch.randn(n, 4, 8, 8, generator=g)
    context = torch.randn(n, 8, 32, generator=g)
    mask = torch.rand(n, 8, generator=g) > 0.3
    mask[:, 0] = True
    cfg = LDMTrainingConfig.model_validate(
        {
            "denoiser": {**UNET_PRESETS["tiny"].to_dict(), "context_dim": 32},
            "diffusion": {"kind": "ddpm", "prediction": "v", "min_snr_gamma": 5.0},
            "trainer": {
                "steps": STEPS,
                "batch_size": 4,
                "lr": LR,
                "checkpoint_every": STOP_AT,
                "log_every": 1,
                "ema_decay": 0.9,
                "cond_dropout": 0.5,
                "warmup_steps": 1,
            },
        }
    )
    uncond = (torch.zeros(1, 8, 32), torch.ones(1, 8, dtype=torch.bool))
    return cfg, InMemoryDataset(latents=latents, context=context, context_mask=mask), uncond


def _train(kind: str, ckpt_dir: str, should_stop=None):
    if kind == "ae":
        cfg, data = _ae_setup()
        return train_autoencoder(cfg, data, checkpoint_dir=ckpt_dir, perceptual=None, should_stop=should_stop)
    cfg, data, uncond = _ldm_setup()
    return train_ldm(cfg, data, uncond=uncond, checkpoint_dir=ckpt_dir, should_stop=should_stop)


def _first_rows(self, x):
    """The planted defect: every rank keeps the first rows of a global-batch draw, not its own (rank r::world)."""
    return x if self.world_size == 1 else x[: len(x) // self.world_size]


def _actnorm_batch() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _actnorm_init(rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """ActNorm's scale and offset after the discriminator's first training forward (on this rank's rows)."""
    torch.manual_seed(0)
    disc = NLayerDiscriminator(DiscriminatorConfig(ndf=8, n_layers=2, norm="actnorm")).train()
    init_actnorm_from_global_batch(disc)
    disc(_actnorm_batch()[rank::world])
    return {k: v for k, v in disc.state_dict().items() if k.endswith((".loc", ".scale"))}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One of the 2 processes: both trainers, each run whole, then interrupted at STOP_AT and resumed, then run whole
    once more with a planted defect; and ActNorm's initialization."""
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
    with distributed.distributed_session("gloo") as ctx:
        assert (ctx.rank, ctx.world_size) == (rank, world)
        for kind in KINDS:
            full = _train(kind, f"{out}/{kind}/full")
            part = _train(kind, f"{out}/{kind}/resumed", should_stop=lambda step: step == STOP_AT)
            resumed = _train(kind, f"{out}/{kind}/resumed")
            with mock.patch.object(BatchShard, "take", _first_rows):
                _train(kind, f"{out}/{kind}/planted")
            if rank == 0:
                torch.save(
                    {"history": full.history, "stopped_at": part.step, "resumed_from": resumed.resumed_from},
                    f"{out}/{kind}/rank0.pt",
                )
        torch.save(_actnorm_init(rank, world), f"{out}/actnorm_rank{rank}.pt")
        # BatchNorm under DDP needs SyncBatchNorm, which is GPU-only: on CPU every rank refuses before any collective
        cfg, data = _ae_setup()
        cfg.discriminator.norm = "batch"
        try:
            train_autoencoder(cfg, data, perceptual=None)
        except ValueError as e:
            Path(f"{out}/batchnorm_error_rank{rank}.txt").write_text(str(e))


def _final(ckpt_dir: Path) -> dict:
    return CheckpointManager(str(ckpt_dir)).load(STEPS)


def _is_key_bias(name: str) -> bool:
    """An attention key bias (the autoencoder's mid-block attention): exactly zero gradient, see the docstring."""
    return name.endswith("attn_1.k.bias")


def _moved_fraction(a: dict, b: dict, parts: tuple[str, ...]) -> tuple[float, float]:
    """(fraction of float elements more than MOVED apart, max |a − b|), key biases left out; other entries equal."""
    moved = total = 0
    abs_max = 0.0
    for part in parts:
        assert a[part].keys() == b[part].keys(), part
        for k, v in a[part].items():
            if not v.is_floating_point():
                assert torch.equal(v, b[part][k]), f"{part}.{k}"
            elif not _is_key_bias(k):
                d = (v - b[part][k]).abs()
                moved, total = moved + int((d > MOVED).sum()), total + d.numel()
                abs_max = max(abs_max, float(d.max()))
    return moved / total, abs_max


def _diffs(a: dict, b: dict, parts: tuple[str, ...]) -> float:
    """max |a − b| over every float tensor of the checkpoint parts (others must be equal)."""
    abs_max = 0.0
    for part in parts:
        assert a[part].keys() == b[part].keys(), part
        for k, v in a[part].items():
            if v.is_floating_point():
                abs_max = max(abs_max, float((v - b[part][k]).abs().max()))
            else:
                assert torch.equal(v, b[part][k]), f"{part}.{k}"
    return abs_max


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    """Both trainers under 2 gloo processes (one spawn: each process pays torch's import once)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out


@pytest.fixture
def one_thread():
    """The 1-process reference on one thread, like each worker (fewer float-summation orders to differ in)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------

PARTS = {"ae": ("model", "loss", "ema"), "ldm": ("model", "ema")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_take_the_steps_of_one_process(two_process_runs, tmp_path, one_thread, kind):
    single = _train(kind, str(tmp_path / "single"))
    one, two = _final(tmp_path / "single"), _final(two_process_runs / kind / "full")
    fraction, abs_diff = _moved_fraction(one, two, PARTS[kind])
    print(
        f"{kind}: after {STEPS} steps, 1 vs 2 processes over {PARTS[kind]}: {fraction:.2g} of the elements more than "
        f"{MOVED:.2g} apart (bound {MAX_MOVED_FRACTION}), max |diff| {abs_diff:.3g}"
    )
    assert fraction <= MAX_MOVED_FRACTION
    assert one["position"] == two["position"]

    # the logged means are the global batch's: the 2-process history is the 1-process history
    rank0 = torch.load(two_process_runs / kind / "rank0.pt")
    loss_key = "total" if kind == "ae" else "loss"
    assert (
        [s for s, _ in single.history[loss_key]]
        == [s for s, _ in rank0["history"][loss_key]]
        == list(range(1, STEPS + 1))
    )
    for (_, v1), (_, v2) in zip(single.history[loss_key], rank0["history"][loss_key]):
        assert v1 == pytest.approx(v2, rel=1e-5, abs=1e-6)
    if kind == "ae":  # the discriminator trained (from step 1) and ActNorm was initialized from the global batch
        assert [s for s, _ in single.history["d_loss"]] == list(
            range(2, STEPS + 1)
        )  # steps 1.. (0-based), logged as 2..
        actnorm = [k for k in two["loss"] if k.endswith(".initialized")]
        assert actnorm and all(bool(two["loss"][k]) for k in actnorm)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_resume_under_two_processes_equals_the_uninterrupted_run(two_process_runs, kind):
    rank0 = torch.load(two_process_runs / kind / "rank0.pt")
    assert rank0["stopped_at"] == STOP_AT and rank0["resumed_from"] == STOP_AT
    full, resumed = _final(two_process_runs / kind / "full"), _final(two_process_runs / kind / "resumed")
    assert _diffs(full, resumed, PARTS[kind]) == 0.0
    assert full["position"] == resumed["position"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_the_comparison_sees_a_run_whose_ranks_share_their_noise(two_process_runs, kind):
    fraction, _ = _moved_fraction(
        _final(two_process_runs / kind / "full"), _final(two_process_runs / kind / "planted"), PARTS[kind]
    )
    print(f"{kind}: planted defect moved {fraction:.2g} of the elements")
    assert fraction > 100 * MAX_MOVED_FRACTION


def test_actnorm_initializes_from_the_global_batch_under_two_processes(two_process_runs, one_thread):
    """Every rank initializes ActNorm from the gathered global batch: bit for bit what one process computes."""
    rank0, rank1 = (torch.load(two_process_runs / f"actnorm_rank{r}.pt") for r in range(2))
    single = _actnorm_init()
    assert single.keys() == rank0.keys() == rank1.keys() and single
    for k in single:
        assert torch.equal(rank0[k], single[k]) and torch.equal(rank1[k], single[k]), k


def test_attention_key_biases_do_not_change_the_output():
    """Why the comparison leaves them out: their exact gradient is 0, so they carry rounding noise alone."""
    model = build_autoencoder(autoencoder_preset("tiny", ch=16, norm_groups=8)).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        before = model.decode_latents(model.encode_latents(x))
        for name, p in model.named_parameters():
            if _is_key_bias(name):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 10)
        after = model.decode_latents(model.encode_latents(x))
    assert any(_is_key_bias(n) for n, _ in model.named_parameters())
    assert (after - before).abs().max() < 1e-4 * before.abs().max()


def test_a_two_process_checkpoint_resumes_in_one_process_with_a_warning(two_process_runs, tmp_path, caplog):
    import shutil

    shutil.copytree(two_process_runs / "ldm" / "full", tmp_path / "ckpt")
    cfg, data, uncond = _ldm_setup()
    cfg.trainer.steps = STEPS + 1
    with caplog.at_level("WARNING", logger="ldm_core.trainers.run_state"):
        result = train_ldm(cfg, data, uncond=uncond, checkpoint_dir=str(tmp_path / "ckpt"))
    assert result.resumed_from == STEPS and result.step == STEPS + 1
    assert any("written by 2 processes with 1" in r.getMessage() for r in caplog.records)


def test_batchnorm_under_cpu_ddp_is_refused_with_what_to_use_instead(two_process_runs):
    for rank in range(2):
        message = (two_process_runs / f"batchnorm_error_rank{rank}.txt").read_text()
        assert "SyncBatchNorm" in message and "actnorm" in message


def test_batch_shard_draws_are_the_global_draw_sliced():
    world = 3
    full = torch.randn(6, 2, generator=torch.Generator().manual_seed(5))
    rows = [BatchShard(r, world).randn((2, 2), torch.Generator().manual_seed(5)) for r in range(world)]
    for r in range(world):
        assert torch.equal(rows[r], full[r::world])
    assert torch.equal(BatchShard().randn((6, 2), torch.Generator().manual_seed(5)), full)
    with pytest.raises(ValueError):
        BatchShard(3, 3)


def test_global_batch_splits_exactly_or_says_why():
    assert split_global_batch(32, None, 4) == (8, 1)
    assert split_global_batch(32, 2, 4) == (2, 4)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        split_global_batch(32, None, 3)
    with pytest.raises(ValueError, match="multiple of 6"):
        split_global_batch(16, 3, 2)  # 8 per process is not a multiple of the micro-batch 3
