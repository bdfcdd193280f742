"""A pretrained diffusers AutoencoderKL found (local folder, S3, the local Hugging Face cache) and converted exactly."""

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from huggingface_hub import constants as hf_constants

from ldm_core.interop.folders import PretrainedSourceNotFound
from ldm_core.interop.pretrained_vae import load_pretrained_autoencoder, pretrained_autoencoder_config
from ldm_core.model_io import weights_sha256
from tests.tiny_autoencoders import fake_hf_cache, save_tiny_autoencoder_kl, upload_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[int, object]:
    root = tmp_path_factory.mktemp("vaes")
    return {
        4: save_tiny_autoencoder_kl(root / "c4", 4, seed=1, scaling_factor=0.3),
        16: save_tiny_autoencoder_kl(root / "c16", 16, seed=2, scaling_factor=0.7, shift_factor=0.1),
    }


@pytest.mark.parametrize("channels", [4, 16])
def test_the_converted_autoencoder_encodes_and_decodes_as_diffusers_does(folders, channels):
    pre = load_pretrained_autoencoder(str(folders[channels]))
    theirs = DiffusersAutoencoderKL.from_pretrained(folders[channels]).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        post, their_post = pre.model.encode(x), theirs.encode(x).latent_dist
        assert post.mean.shape == (2, channels, 8, 8)
        torch.testing.assert_close(post.mean, their_post.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(post.logvar, their_post.logvar, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            pre.model.decode(post.mean), theirs.decode(their_post.mean).sample, rtol=1e-5, atol=1e-5
        )
    cfg = pre.model.config
    assert (cfg.scaling_factor, cfg.shift_factor) == ((0.3, 0.0) if channels == 4 else (0.7, 0.1))
    assert pre.weights_sha256 == weights_sha256(pre.model)


def test_an_s3_pipeline_folder_loads_the_same_weights_as_the_local_folder(folders, s3_url):
    upload_folder(folders[16], f"{s3_url}/sd3/vae")
    remote = load_pretrained_autoencoder(f"{s3_url}/sd3", subfolder="vae")
    assert remote.weights_sha256 == load_pretrained_autoencoder(str(folders[16])).weights_sha256
    assert remote.source == f"{s3_url}/sd3 (subfolder vae)"
    with pytest.raises(PretrainedSourceNotFound, match=f"{s3_url}/sd3/unet/config.json"):
        load_pretrained_autoencoder(f"{s3_url}/sd3", subfolder="unet")


def test_a_repo_id_is_found_in_the_local_hugging_face_cache_only(folders, tmp_path, monkeypatch):
    cache = fake_hf_cache(tmp_path / "hub", "tiny-org/tiny-sd", folders[4], "vae")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no local folder of that name shadows the repo id
    found = load_pretrained_autoencoder("tiny-org/tiny-sd", subfolder="vae")
    assert found.weights_sha256 == load_pretrained_autoencoder(str(folders[4])).weights_sha256
    assert pretrained_autoencoder_config("tiny-org/tiny-sd", "vae").z_channels == 4
    with pytest.raises(PretrainedSourceNotFound) as missing:
        load_pretrained_autoencoder("tiny-org/not-cached", subfolder="vae")
    message = str(missing.value)
    assert "\n" not in message and "'tiny-org/not-cached'" in message and str(cache) in message
    assert str(tmp_path / "tiny-org" / "not-cached" / "vae" / "config.json") in message


def test_a_missing_folder_is_one_line_naming_where_it_looked(tmp_path):
    with pytest.raises(PretrainedSourceNotFound) as missing:
        load_pretrained_autoencoder(str(tmp_path / "nowhere"))
    assert str(missing.value) == (
        f"pretrained source {str(tmp_path / 'nowhere')!r} not found: looked for the folder "
        f"{tmp_path / 'nowhere' / 'config.json'}"
    )


def test_a_folder_of_another_diffusers_class_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "VQModel", "latent_channels": 3}')
    with pytest.raises(ValueError, match="holds a diffusers VQModel, not an AutoencoderKL"):
        pretrained_autoencoder_config(str(tmp_path))
    with pytest.raises(ValueError, match="holds a diffusers VQModel, not an AutoencoderKL"):
        load_pretrained_autoencoder(str(tmp_path))
