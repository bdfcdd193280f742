"""Reconstruction fidelity: per colour class, worst decile, channel shift, and the verdict on each bound."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ldm_core.data.synthetic import COLORS
from ldm_core.evaluation.attributes import color_confusion, confusion_lines
from ldm_core.evaluation.fidelity import FidelityThresholds, fidelity_verdict, reconstruction_fidelity
from ldm_core.evaluation.report import ReportInputs, write_report
from tests.core.shapes_data import ShapesInMemory


@pytest.fixture(scope="module")
def shapes() -> tuple[np.ndarray, list[str]]:
    data = ShapesInMemory(216, seed=3)
    images = ((data.images.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()  # (N, H, W, 3) uint8
    return images, [r["color"] for r in data.rows(range(len(data)))]


def _paint(images: np.ndarray, source: str, target: str) -> np.ndarray:
    """Every pixel of colour ``source`` (and its anti-aliased rim, in proportion) moved to ``target``."""
    a = images.astype(np.float64)
    src, dst = np.array(COLORS[source], float), np.array(COLORS[target], float)
    weight = np.clip(1 - np.linalg.norm(a - src, axis=-1, keepdims=True) / 150.0, 0, 1)  # (N, H, W, 1)
    return np.clip(a + weight * (dst - src), 0, 255).round().astype(np.uint8)


def test_identical_reconstructions_are_perfect(shapes):
    images, colours = shapes
    f = reconstruction_fidelity(images, images.copy(), colours)
    assert set(f.classes) == set(COLORS) and all(c.accuracy == 1.0 for c in f.classes.values())
    assert f.channel_shift == (0.0, 0.0, 0.0) and f.confusions() == []
    assert fidelity_verdict(f, FidelityThresholds()) == (True, [])


def test_red_painted_yellow_is_seen_per_class_while_the_mean_psnr_stays_high(shapes):
    images, colours = shapes
    broken = _paint(images, "red", "yellow")
    f = reconstruction_fidelity(images, broken, colours)
    assert f.classes["red"].accuracy == 0.0 and f.classes["red"].confusion == {"yellow": f.classes["red"].n}
    assert all(f.classes[c].accuracy == 1.0 for c in ("green", "blue", "yellow"))
    assert f.confusions() == [f"red → yellow: {f.classes['red'].n} of {f.classes['red'].n}"]
    assert f.psnr > 25  # three quarters of the images are untouched
    passed, reasons = fidelity_verdict(f, FidelityThresholds())
    assert not passed and reasons[0].startswith("red reconstructed as red in 0%") and "red → yellow" in reasons[0]


def test_the_worst_decile_is_the_mean_of_the_worst_tenth(shapes):
    images, _ = shapes
    recon = images.copy()
    rng = np.random.default_rng(0)
    noise = rng.integers(-3, 4, size=recon.shape)
    recon = np.clip(recon.astype(int) + noise, 0, 255).astype(np.uint8)
    k = int(np.ceil(0.1 * len(images)))
    recon[:k] = 255 - images[:k]  # the worst images, by far
    f = reconstruction_fidelity(images, recon)
    mse = (((recon[:k].astype(float) - images[:k]) / 255) ** 2).reshape(k, -1).mean(1)
    assert f.worst_decile_psnr == pytest.approx(float(np.mean(10 * np.log10(1 / mse))), rel=1e-9)
    assert f.classes is None
    passed, reasons = fidelity_verdict(f, FidelityThresholds(worst_decile_psnr=f.worst_decile_psnr + 0.1))
    assert not passed and "worst-decile PSNR" in reasons[0]


def test_a_tint_is_a_channel_shift(shapes):
    images, colours = shapes
    tinted = np.clip(images.astype(int) + np.array([0, -10, 0]), 0, 255).astype(np.uint8)
    f = reconstruction_fidelity(images, tinted, colours)
    assert f.channel_shift[0] == 0 and f.channel_shift[2] == 0 and -10 <= f.channel_shift[1] < -9
    passed, reasons = fidelity_verdict(f, FidelityThresholds(max_channel_shift=8.0))
    assert not passed and reasons == [f"channel G shifted by {f.channel_shift[1]:+.1f} levels (bound ±8.0)"]
    assert fidelity_verdict(f, FidelityThresholds(max_channel_shift=11.0))[0]


def test_the_verdict_reads_the_measurement_back_from_json(shapes):
    images, colours = shapes
    f = reconstruction_fidelity(images, _paint(images, "blue", "green"), colours)
    stored = json.loads(json.dumps(f.to_dict()))  # what the asset records as metadata
    assert fidelity_verdict(stored, FidelityThresholds()) == fidelity_verdict(f, FidelityThresholds())
    assert not fidelity_verdict(stored, FidelityThresholds())[0]
    off = FidelityThresholds(
        min_class_accuracy=None, worst_decile_psnr=None, max_channel_shift=None, max_foreground_shift=None
    )
    assert fidelity_verdict(stored, off) == (True, [])


def test_bad_inputs_are_refused(shapes):
    images, colours = shapes
    with pytest.raises(ValueError, match="equal non-empty"):
        reconstruction_fidelity(images, images[:-1], colours)
    with pytest.raises(ValueError, match="colours for"):
        reconstruction_fidelity(images, images, colours[:-1])


def test_the_report_shows_the_colour_confusion_of_the_samples(shapes, tmp_path):
    images, colours = shapes
    wanted = [{"color": c} for c in colours]
    predictions = [{"color": "yellow" if c == "red" else c} for c in colours]
    confusion = color_confusion(wanted, predictions)
    n_red = colours.count("red")
    assert confusion["red"] == {"yellow": n_red} and confusion["blue"] == {"blue": colours.count("blue")}
    assert confusion_lines(confusion) == [f"red → yellow: {n_red} of {n_red}"]
    report = write_report(str(tmp_path), ReportInputs(metrics={}, color_confusion=confusion, versions={}))
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert f"red → yellow: {n_red} of {n_red}" in page and 'id="color-confusion"' in page
    assert f"red → yellow: {n_red} of {n_red}" in report.markdown
    assert json.loads((tmp_path / "metrics.json").read_text())["color_confusion"] == confusion
