"""A denoiser's starting weights: diffusers folders (local, pipeline layout, S3) and saved denoisers resolve to our
config + weights + content hash, and every shape that does not fit the store is refused naming both sides."""

from __future__ import annotations

import json

import diffusers
import fsspec
import pytest
import torch

from ldm_core.bundle import save_denoiser
from ldm_core.init_weights import (
    architecture_differences,
    from_diffusers_folder,
    from_saved_denoiser,
    shape_mismatches,
)
from ldm_core.interop import from_diffusers
from ldm_core.interop.backbone_folder import backbone_config_of_folder
from ldm_core.model_io import state_dict_sha256
from ldm_core.models.denoiser import build_denoiser
from ldm_core.models.mmdit import MMDiTConfig
from ldm_core.models.unet import UNET_PRESETS, UNetConfig
from tests.core.tiny_models import tiny_diffusers_unet


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn afresh: zero-initialised layers would let a dropped tensor pass unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def diffusers_unet(cross_attention_dim: int = 12):
    return randomized(tiny_diffusers_unet(cross_attention_dim))


def diffusers_sd3():
    return randomized(
        diffusers.SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=12,
            caption_projection_dim=16,
            pooled_projection_dim=10,
            pos_embed_max_size=8,
        )
    )


def test_unet_folder_becomes_our_unet_with_the_same_outputs(tmp_path):
    theirs = diffusers_unet().eval()
    theirs.save_pretrained(tmp_path / "unet")
    init = from_diffusers_folder(str(tmp_path / "unet"))
    assert init.config.kind == "unet" and init.config.context_dim == 12 and init.source == str(tmp_path / "unet")
    ours = build_denoiser(init.config).eval()
    ours.load_state_dict(init.state_dict, strict=True)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 12)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, t, ctx), theirs(x, t, encoder_hidden_states=ctx).sample, atol=1e-4, rtol=1e-4
        )
    assert init.sha256 == state_dict_sha256(from_diffusers(theirs).state_dict())


def test_pipeline_folder_finds_its_transformer_and_s3_gives_the_same_weights(tmp_path, s3_url):
    pipe = tmp_path / "pipe"
    diffusers_sd3().save_pretrained(pipe / "transformer")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    found = from_diffusers_folder(str(pipe))
    named = from_diffusers_folder(str(pipe), subfolder="transformer")
    assert isinstance(found.config, MMDiTConfig) and found.config.pooled_projection_dim == 10
    assert found.sha256 == named.sha256 and named.source == f"{pipe}/transformer"
    fs, root = fsspec.core.url_to_fs(s3_url)
    fs.put(str(pipe) + "/", root + "/pipe", recursive=True)
    remote = from_diffusers_folder(f"{s3_url}/pipe", subfolder="transformer")
    assert remote.sha256 == found.sha256 and remote.config == found.config
    assert backbone_config_of_folder(f"{s3_url}/pipe") == found.config  # config alone, no weights read


def test_a_folder_that_holds_no_denoiser_is_refused_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a diffusers model folder .*set the subfolder"):
        from_diffusers_folder(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="holds a diffusers AutoencoderKL, not a denoiser we convert"):
        from_diffusers_folder(str(tmp_path))


def test_saved_denoiser_resolves_to_its_weights_and_hash(tmp_path):
    model = build_denoiser(UNET_PRESETS["tiny"])
    save_denoiser(str(tmp_path / "d"), model)
    init = from_saved_denoiser(str(tmp_path / "d"), source="models:/ldm/1")
    assert init.config == UNET_PRESETS["tiny"] and init.source == "models:/ldm/1"
    assert init.sha256 == state_dict_sha256(model.state_dict())


def test_the_hash_is_the_weights_identity():
    sd = build_denoiser(UNET_PRESETS["tiny"]).state_dict()
    reordered = dict(reversed(list(sd.items())))
    assert state_dict_sha256(reordered) == state_dict_sha256(sd)
    changed = {k: v.clone() for k, v in sd.items()}
    changed["conv_in.bias"][0] += 1e-3
    assert state_dict_sha256(changed) != state_dict_sha256(sd)


TINY_UNET = UNET_PRESETS["tiny"]  # 4 channels, context 384, 2 levels
TINY_MMDIT = MMDiTConfig(preset="tiny")  # 4 channels, context 384 pooled by itself, patch 2, positions up to 16


@pytest.mark.parametrize(
    "config, latent, context, pooled, expected",
    [
        (
            TINY_UNET.model_copy(update={"context_dim": 768}),
            (4, 8, 8),
            384,
            384,
            "init_from has context_dim 768; the store's text encoder gives 384",
        ),
        (
            TINY_UNET,
            (16, 8, 8),
            384,
            384,
            "init_from has in_channels 4, out_channels 4; the store's latents have 16 channels",
        ),
        (
            TINY_UNET,
            (4, 7, 8),
            384,
            384,
            "init_from has 2 levels (downsamples by 2); the store's latents are 7x8, not a multiple of it",
        ),
        (
            MMDiTConfig(preset="tiny", pooled_projection_dim=256),
            (4, 8, 8),
            384,
            384,
            "init_from takes pooled vectors of width 256; the store's text encoder gives 384",
        ),
        (
            MMDiTConfig(preset="tiny", patch_size=4, sample_size=8, pos_embed_max_size=4),
            (4, 6, 6),
            384,
            384,
            "init_from has patch_size 4; the store's latents are 6x6, not a multiple of it",
        ),
        (
            TINY_MMDIT,
            (4, 32, 32),
            384,
            384,
            "init_from has positions for latents up to 16 per side (pos_embed_max_size 8 x patch_size 2); the store's "
            "latents are 32x32",
        ),
    ],
)
def test_each_shape_mismatch_is_refused_naming_both_sides(config, latent, context, pooled, expected):
    assert shape_mismatches(config, latent, context, pooled) == [expected]


def test_fitting_shapes_pass():
    assert shape_mismatches(TINY_UNET, (4, 8, 8), 384, None) == []
    assert shape_mismatches(TINY_MMDIT, (4, 8, 8), 384, 384) == []


def test_architecture_differences_name_the_fields():
    assert architecture_differences(TINY_UNET, TINY_UNET.model_copy(update={"gradient_checkpointing": True})) == []
    wider = UNetConfig(**{**TINY_UNET.to_dict(), "model_channels": 64})
    assert architecture_differences(TINY_UNET, wider) == ["model_channels 32 vs 64"]
    assert architecture_differences(TINY_UNET, TINY_MMDIT) == ["kind unet vs mmdit"]
