"""PSNR, SSIM and LPIPS against closed forms and reference implementations; the "not computed" path for LPIPS."""

import math
import warnings

import lpips as lpips_pkg
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from ldm_core import pretrained
from ldm_core.evaluation.metrics import PSNR_CAP_DB, MetricResult, lpips, metric_value, psnr, ssim
from tests.core.torch_home import use_torch_home


def test_psnr_matches_the_closed_form_for_a_known_error():
    # every pixel off by exactly 10/255: MSE = (10/255)², PSNR = 20·log10(255/10)
    a = np.full((3, 16, 16, 3), 100, np.uint8)
    b = a + np.uint8(10)
    r = psnr(a, b)
    assert r.computed and r.n == 3 and not r.capped
    assert r.value == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)
    # float inputs in [0, 1] give the same number
    assert psnr(a / 255.0, b / 255.0).value == pytest.approx(r.value, abs=1e-9)


def test_psnr_is_the_mean_of_per_image_values():
    a = np.zeros((2, 8, 8, 3), np.uint8)
    b = a.copy()
    b[0] += 5
    b[1] += 50
    expected = np.mean([20 * math.log10(255 / 5), 20 * math.log10(255 / 50)])
    assert psnr(a, b).value == pytest.approx(expected, abs=1e-9)


def test_identical_images_give_a_capped_flagged_psnr():
    a = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    r = psnr(a, a)
    assert r.value == PSNR_CAP_DB and r.capped and "2 identical" in r.note
    b = a.copy()
    b[1, 0, 0, 0] ^= 1  # one image differs by one grey level in one value
    mixed = psnr(a, b)
    single = 10 * math.log10(1 / ((1 / 255) ** 2 / (16 * 16 * 3)))
    assert mixed.capped and mixed.value == pytest.approx((PSNR_CAP_DB + single) / 2)
    assert math.isfinite(mixed.value)


def test_inputs_in_the_model_range_are_refused_not_misread():
    x = torch.rand(2, 8, 8, 3) * 2 - 1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        psnr(x, x)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 9, 3), np.uint8))


def test_ssim_of_identical_images_is_one_and_matches_skimage():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, a).value == pytest.approx(1.0, abs=1e-9)
    reference = np.mean(
        [
            structural_similarity(
                x / 255.0,
                y / 255.0,
                channel_axis=-1,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=1.0,
            )
            for x, y in zip(a, b)
        ]
    )
    r = ssim(a, b)
    assert r.n == 3 and 0.5 < r.value < 1.0
    # the two libraries treat the image border differently; the interiors agree
    assert r.value == pytest.approx(reference, abs=1e-3)


def test_ssim_of_two_flat_images_is_the_luminance_term():
    # constant images have no variance: SSIM reduces to (2·μx·μy + C1) / (μx² + μy² + C1), C1 = (0.01·L)²
    mx, my = 0.2, 0.6
    a = np.full((1, 16, 16, 3), mx)
    b = np.full((1, 16, 16, 3), my)
    c1 = 0.01**2
    assert ssim(a, b).value == pytest.approx((2 * mx * my + c1) / (mx**2 + my**2 + c1), abs=1e-6)


def test_ssim_on_images_smaller_than_its_window_is_not_computed():
    a = np.zeros((1, 8, 8, 3), np.uint8)
    r = ssim(a, a)
    assert not r.computed and r.value is None and "11×11" in r.reason


def test_lpips_without_vgg_weights_is_not_computed_and_names_the_file(tmp_path, monkeypatch):
    use_torch_home(monkeypatch, tmp_path / "empty")
    a = np.zeros((2, 16, 16, 3), np.uint8)
    r = lpips(a, a, download=False)
    assert not r.computed and r.value is None and r.n == 0
    expected = pretrained.expected_path("vgg16")
    assert expected.name == "vgg16-397923af.pth"
    assert expected.name in r.reason and str(expected.parent) in r.reason and "download.pytorch.org" in r.reason


def test_lpips_with_a_model_is_the_mean_distance_of_that_model():
    torch.manual_seed(0)
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=` flag
        warnings.simplefilter("ignore", UserWarning)
        model = lpips_pkg.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).eval()
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    r = lpips(a, b, model=model, batch_size=2)  # two batches: the mean must span both
    to_model = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
    with torch.no_grad():
        expected = model(to_model(a), to_model(b)).flatten().double().mean().item()
    assert r.computed and r.n == 3 and r.value == pytest.approx(expected, rel=1e-5)
    assert lpips(a, a, model=model).value == pytest.approx(0.0, abs=1e-7)


def test_metric_results_round_trip_and_refuse_inconsistent_states():
    r = MetricResult("psnr", 24.19, 500, note="kl-f8 anchor")
    assert MetricResult.from_dict(r.to_dict()) == r
    assert metric_value(r) == 24.19 and metric_value(r.to_dict()) == 24.19 and metric_value(3) == 3.0
    missing = MetricResult.not_computed("fid", "weights missing")
    assert metric_value(missing) is None and metric_value(missing.to_dict()) is None and metric_value(None) is None
    with pytest.raises(ValueError):
        MetricResult("psnr", float("inf"), 1)
    with pytest.raises(ValueError):
        MetricResult("fid", None, 0, computed=False)  # not computed must say why
