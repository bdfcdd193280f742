"""LoRA fine-tuning (ldm_core.lora through train_ldm): only the adapter trains, the base stays bit for bit, a run
resumes to the same adapter, the checkpoint holds no base, and the saved model generates with its adapter."""

import copy

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm_core.bundle import load_denoiser, load_text_to_image, save_denoiser, save_text_to_image
from ldm_core.checkpoint import CheckpointManager
from ldm_core.data.memory import InMemoryDataset
from ldm_core.diffusion import DiffusionConfig
from ldm_core.init_weights import from_saved_denoiser
from ldm_core.interop.pipeline_export import export_diffusers
from ldm_core.lora import (
    LoraConfig,
    adapter_state_dict,
    add_lora,
    base_state_dict,
    has_lora,
    is_adapter_weight,
    load_adapter_state_dict,
    merged,
)
from ldm_core.model_io import read_model_meta
from ldm_core.models.autoencoder import autoencoder_preset, build_autoencoder
from ldm_core.models.denoiser import build_denoiser
from ldm_core.models.mmdit import MMDiTConfig
from ldm_core.models.unet import UNET_PRESETS
from ldm_core.text_encoder import TextEncoder, TextEncoderConfig
from ldm_core.trainers.ldm import LDMTrainingConfig, train_ldm

TEXT = TextEncoderConfig(max_length=8)


@pytest.fixture(scope="module")
def text():
    enc = TextEncoder(TEXT)
    empty = enc.empty()
    return enc, (empty.embeddings, empty.mask, empty.pooled)


def _data(enc, n: int = 16) -> InMemoryDataset:
    g = torch.Generator().manual_seed(0)
    emb = enc.encode(["a red square", "a blue circle"] * (n // 2))
    return InMemoryDataset(
        latents=torch.randn(n, 4, 8, 8, generator=g), context=emb.embeddings, context_mask=emb.mask, pooled=emb.pooled
    )


def _config(denoiser=None, lora=None, **trainer) -> LDMTrainingConfig:
    return LDMTrainingConfig.model_validate(
        {
            "denoiser": (denoiser or UNET_PRESETS["tiny"]).to_dict(),
            "diffusion": {"kind": "flow", "sample_steps": 4},
            "trainer": {
                "steps": 5,
                "batch_size": 8,
                "micro_batch_size": 4,
                "lr": 1e-2,
                "warmup_steps": 2,
                "checkpoint_every": 2,
                "log_every": 1,
                "ema_decay": 0.9,
                "cond_dropout": 0.2,
                **trainer,
            },
            "lora": (lora or LoraConfig(rank=2, dropout=0.1)).to_dict(),
        }
    )


def _base(cfg: LDMTrainingConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    """A trained base's stand-in. A fresh denoiser's zero-initialised output layers (the UNet's proj_out, the
    MMDiT's gates) pass no gradient to the attention before them, so an adapter on a fresh init would not move."""
    torch.manual_seed(seed)
    sd = build_denoiser(cfg.denoiser).state_dict()
    return {k: 0.05 * torch.randn_like(v) if v.dim() > 1 and not v.any() else v.clone() for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ema", [None, 0.9])
def test_only_the_adapter_trains_and_the_base_is_bitwise_unchanged(text, ema):
    enc, uncond = text
    cfg = _config(ema_decay=ema)
    base = _base(cfg)
    result = train_ldm(cfg, _data(enc), uncond=uncond, init_weights=base)
    model = result.model
    after = base_state_dict(model)
    assert after.keys() == base.keys()
    for k, v in base.items():
        assert torch.equal(after[k], v), k
    adapter = adapter_state_dict(model)
    # B starts at zero: a trained adapter has moved it
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    if ema is None:  # the trained (not averaged) model: only the adapter ever asked for gradients
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(is_adapter_weight(n) for n in trainable)


def test_default_targets_are_every_attention_projection_of_either_backbone():
    unet = add_lora(build_denoiser(UNET_PRESETS["tiny"]), LoraConfig())
    adapted = {
        n.removesuffix(".lora_A.weight").rsplit(".", 1)[-1]
        for n in adapter_state_dict(unet)
        if n.endswith("lora_A.weight")
    }
    assert adapted == {"qkv", "to_q", "to_kv", "to_out"}
    mmdit = add_lora(build_denoiser(MMDiTConfig(preset="tiny", depth=2)), LoraConfig())
    names = {n.removesuffix(".lora_A.weight") for n in adapter_state_dict(mmdit) if n.endswith("lora_A.weight")}
    # both streams' fused qkv, and the output projection of each stream that has one (the last text stream has none)
    assert names == {
        f"joint_blocks.{n}"
        for n in (
            "0.x_block.qkv",
            "0.context_block.qkv",
            "0.x_block.to_out",
            "0.context_block.to_out",
            "1.x_block.qkv",
            "1.context_block.qkv",
            "1.x_block.to_out",
        )
    }


def test_an_interrupted_lora_run_resumes_to_the_same_adapter(text, tmp_path):
    enc, uncond = text
    cfg = _config()
    data, base = _data(enc), _base(cfg)
    full = train_ldm(cfg, data, uncond=uncond, checkpoint_dir=str(tmp_path / "a"), init_weights=base)
    part = train_ldm(
        cfg, data, uncond=uncond, checkpoint_dir=str(tmp_path / "b"), init_weights=base, should_stop=lambda s: s == 3
    )
    assert not part.finished
    resumed = train_ldm(cfg, data, uncond=uncond, checkpoint_dir=str(tmp_path / "b"), init_weights=base)
    assert resumed.resumed_from == 3 and resumed.step == 5
    want, got = full.model.state_dict(), resumed.model.state_dict()
    assert want.keys() == got.keys()
    for k, v in want.items():
        assert torch.equal(v, got[k]), k
    # the checkpoint holds the adapter, its EMA and optimizer state and the base's hash, never the base itself
    _, state = CheckpointManager(str(tmp_path / "b")).load_latest()
    assert state["model"].keys() == adapter_state_dict(full.model).keys() == state["ema"].keys()
    assert len(state["base"]["sha256"]) == 64


def test_a_resume_on_other_base_weights_or_another_adapter_is_refused(text, tmp_path):
    enc, uncond = text
    cfg = _config(steps=4)
    data, ckpt = _data(enc), str(tmp_path / "c")
    train_ldm(cfg, data, uncond=uncond, checkpoint_dir=ckpt, init_weights=_base(cfg), should_stop=lambda s: s == 2)
    with pytest.raises(ValueError, match="trained on base weights"):
        train_ldm(cfg, data, uncond=uncond, checkpoint_dir=ckpt, init_weights=_base(cfg, seed=2))
    with pytest.raises(ValueError, match="different lora config"):
        train_ldm(
            _config(steps=4, lora=LoraConfig(rank=3)), data, uncond=uncond, checkpoint_dir=ckpt, init_weights=_base(cfg)
        )
    full = cfg.model_copy(update={"lora": None})
    with pytest.raises(ValueError, match="different lora config"):
        train_ldm(full, data, uncond=uncond, checkpoint_dir=ckpt, init_weights=_base(cfg))


def test_a_target_that_names_no_layer_is_one_clear_line():
    with pytest.raises(ValueError, match=r"^lora.target_modules: 'to_k' names no Linear layer of the unet denoiser"):
        add_lora(build_denoiser(UNET_PRESETS["tiny"]), LoraConfig(target_modules=["to_k"]))


def test_adapter_weights_of_another_rank_are_refused():
    model = add_lora(build_denoiser(UNET_PRESETS["tiny"]), LoraConfig(rank=2))
    other = add_lora(build_denoiser(UNET_PRESETS["tiny"]), LoraConfig(rank=3))
    with pytest.raises(ValueError, match="do not fit this LoRA config"):
        load_adapter_state_dict(model, adapter_state_dict(other))


# ---------------------------------------------------------------------------------------------------------------
# The saved model: base + adapter
# ---------------------------------------------------------------------------------------------------------------


def _adapted(seed: int = 0, b_scale: float = 0.5) -> torch.nn.Module:
    """A tiny UNet base (`_base`) with an adapter whose B is nonzero (a trained one's stand-in)."""
    model = build_denoiser(UNET_PRESETS["tiny"])
    model.load_state_dict(_base(_config(), seed))
    model = add_lora(model, LoraConfig(rank=2))
    sd = {k: (torch.randn_like(v) * b_scale if "lora_B" in k else v) for k, v in adapter_state_dict(model).items()}
    load_adapter_state_dict(model, sd)
    return model.eval()


def _bundle(url, denoiser, **kw) -> str:
    torch.manual_seed(5)
    vae = build_autoencoder(autoencoder_preset("tiny")).eval()
    return save_text_to_image(
        str(url),
        denoiser=denoiser,
        vae=vae,
        diffusion_config=DiffusionConfig(kind="flow", sample_steps=4),
        text_encoder_config=TEXT,
        latent_shape=(4, 8, 8),
        **kw,
    )


def _images(url) -> np.ndarray:
    return load_text_to_image(str(url)).generate(["a red square", "a blue circle"], seed=3)


def test_the_registered_model_generates_with_its_adapter(tmp_path):
    model = _adapted()
    adapted = _images(_bundle(tmp_path / "lora", model, base_source="models:/ldm/1"))
    loaded = load_text_to_image(str(tmp_path / "lora")).denoiser
    assert has_lora(loaded)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    meta = read_model_meta(str(tmp_path / "lora" / "denoiser" / "lora"))
    assert meta["base"] == {
        "sha256": read_model_meta(str(tmp_path / "lora" / "denoiser"))["weights_sha256"],
        "source": "models:/ldm/1",
    }
    # the bundle's base is the base alone; its images are not the adapted model's
    base_only = build_denoiser(UNET_PRESETS["tiny"]).eval()
    base_only.load_state_dict(base_state_dict(model))
    base_images = _images(_bundle(tmp_path / "base", base_only))
    assert np.abs(adapted.astype(int) - base_images.astype(int)).mean() > 1.0
    # an adapter whose B is zero adds exactly nothing: the base's images, bit for bit
    zeroed = _images(_bundle(tmp_path / "zero", _adapted(b_scale=0.0)))
    np.testing.assert_array_equal(zeroed, base_images)


def test_a_plain_save_over_a_lora_one_leaves_no_adapter_behind(tmp_path):
    url = str(tmp_path / "d")
    save_denoiser(url, _adapted())
    plain = build_denoiser(UNET_PRESETS["tiny"])
    save_denoiser(url, plain)
    assert not has_lora(load_denoiser(url))


def test_an_adapter_beside_other_base_weights_is_refused(tmp_path):
    url = str(tmp_path / "d")
    save_denoiser(url, _adapted(seed=0))
    other = _adapted(seed=1)
    # a torn overwrite: another base's weights and config under the first adapter
    save_denoiser(str(tmp_path / "other"), other)
    for name in ("model.safetensors", "config.json"):
        (tmp_path / "d" / name).write_bytes((tmp_path / "other" / name).read_bytes())
    with pytest.raises(ValueError, match="needs base weights"):
        load_denoiser(url)


def test_merged_is_a_plain_denoiser_with_the_adapted_outputs():
    model = _adapted()
    plain = merged(model)
    assert not has_lora(plain) and has_lora(model)
    assert plain.state_dict().keys() == build_denoiser(UNET_PRESETS["tiny"]).state_dict().keys()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7])
    ctx, mask = torch.randn(2, 8, UNET_PRESETS["tiny"].context_dim), torch.ones(2, 8, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, ctx, mask), model(x, t, ctx, mask), rtol=1e-4, atol=1e-5)


def _outputs(model: torch.nn.Module, t: tuple[float, ...] = (0.3, 0.7)) -> torch.Tensor:
    """The model's outputs computed in float64. The merged weights W + s·B·A were rounded to fp32 once (a relative
    error of about 6e-8 per weight); in float64 compute that is all that separates the two sides, so outputs of
    order 1 agree to well within 1e-5, while fp32 compute alone reorders sums and moves them by about 1e-4."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ctx = torch.randn(
        2, 8, UNET_PRESETS["tiny"].context_dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    model = copy.deepcopy(model).double()
    with torch.no_grad():
        return model(x, torch.tensor(t, dtype=torch.float64), ctx, torch.ones(2, 8, dtype=torch.bool))


def test_a_warm_start_from_a_lora_model_starts_from_the_adapted_network(tmp_path):
    """init_from a registered LoRA model: the starting weights are its base with the adapter merged, never the bare
    base (which would silently drop what the adapter learned)."""
    model = _adapted()
    save_denoiser(str(tmp_path / "d"), model, base_source="models:/ldm/1")
    init = from_saved_denoiser(str(tmp_path / "d"))
    assert init.state_dict.keys() == build_denoiser(UNET_PRESETS["tiny"]).state_dict().keys()
    start = build_denoiser(init.config).eval()
    start.load_state_dict(init.state_dict)
    torch.testing.assert_close(_outputs(start), _outputs(model), rtol=0, atol=1e-5)
    bare = build_denoiser(UNET_PRESETS["tiny"]).eval()
    bare.load_state_dict(base_state_dict(model))
    assert (_outputs(bare) - _outputs(model)).abs().max() > 1e-2  # the adapter matters: the check can fail


def test_a_lora_model_exports_to_diffusers_merged(tmp_path):
    model = _adapted()
    bundle = load_text_to_image(_bundle(tmp_path / "b", model))
    out = export_diffusers(bundle, str(tmp_path / "export"))
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "export" / out.denoiser_dir)).eval().double()
    t = (300.0, 700.0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ctx = torch.randn(
        2, 8, UNET_PRESETS["tiny"].context_dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    with torch.no_grad():
        theirs = unet(x, torch.tensor(t, dtype=torch.float64), encoder_hidden_states=ctx).sample
    torch.testing.assert_close(theirs, _outputs(model, t), rtol=0, atol=1e-5)
