"""The one-call evaluation (what the `evaluation_report` asset runs): an oracle model that draws exactly what each
caption says scores perfectly and is promoted; a model that draws nothing fails the gate against it, with reasons."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ldm_core.data import ImageShardDataset, IngestConfig, ingest, write_shapes_source
from ldm_core.data.synthetic import ShapeSpec, render_shape
from ldm_core.evaluation.attributes import parse_caption
from ldm_core.evaluation.evaluate import (
    EvaluationConfig,
    evaluate,
    held_out_from_dataset,
    text_to_image_functions,
)
from ldm_core.evaluation.gate import GateConfig, MetricRule
from ldm_core.evaluation.metrics import PSNR_CAP_DB
from ldm_core.grids import to_uint8
from ldm_core.models.autoencoder import autoencoder_preset, build_autoencoder


def oracle_generate(prompts, seed):
    """Draws exactly what each caption asks for; the seed picks the background grey, as noise would vary an image."""
    out = []
    for i, prompt in enumerate(prompts):
        a = parse_caption(prompt)
        spec = ShapeSpec(a["shape"], a["color"], a["size"], a["position"], background=224 + 2 * ((seed + i) % 14))
        out.append(np.asarray(render_shape(spec, 32)))
    return np.stack(out)


def blank_generate(prompts, seed):
    return np.full((len(prompts), 32, 32, 3), 240, np.uint8)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_shapes_source(str(root / "src"), 60, seed=3)
    ingest(IngestConfig(source=str(root / "src"), val_fraction=0.5), str(root / "ds"))
    return held_out_from_dataset(ImageShardDataset(str(root / "ds"), split="validation"), max_items=24)


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    """No pretrained weights anywhere: LPIPS and FID must come out as not computed, saying which file is missing."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


CONFIG = EvaluationConfig(
    grid_size=3,
    grid_seeds=[0, 5],
    generated_samples=20,
    reconstruction_samples=8,
    download_weights=False,
    gate=GateConfig(
        rules={
            "color_acc": MetricRule(higher_is_better=True, min=0.9, tolerance=0.02),
            "shape_acc": MetricRule(higher_is_better=True, min=0.7, tolerance=0.02),
            "fid": MetricRule(higher_is_better=False, tolerance=1.0),
        }
    ),
)


def test_held_out_rows_carry_images_captions_and_attributes(held_out):
    assert held_out.images.shape[1:] == (32, 32, 3) and held_out.images.dtype == np.uint8
    assert 10 <= len(held_out.images) <= 24 and len(held_out.captions) == len(held_out.images)
    for caption, attributes in zip(held_out.captions, held_out.attributes):
        assert parse_caption(caption) == attributes  # the attribute columns say what the caption says


def test_an_oracle_model_scores_perfectly_and_a_first_model_is_promoted(tmp_path, held_out, offline_home):
    result = evaluate(
        str(tmp_path / "report"),
        generate_fn=oracle_generate,
        reconstruct_fn=lambda x: x.copy(),
        held_out=held_out,
        config=CONFIG,
        loss_curves={"ldm": {"loss": [(0, 1.0), (10, 0.5)]}},
        run_config={"preset": "demo"},
        created_at="t0",
    )
    m = result.metrics
    assert m["color_acc"].value == 1.0 and m["shape_acc"].value == 1.0 and m["position_acc"].value == 1.0
    assert m["color_acc"].n == 20
    assert m["psnr"].value == PSNR_CAP_DB and m["psnr"].capped and m["ssim"].value == pytest.approx(1.0)
    assert m["psnr"].n == 8
    for name, file in [
        ("lpips", "vgg16-397923af.pth"),
        ("rfid", "weights-inception-2015-12-05-6726825d.pth"),
        ("fid", "weights-inception-2015-12-05-6726825d.pth"),
    ]:
        assert not m[name].computed and file in m[name].reason and str(tmp_path / "torch_home") in m[name].reason
    d = result.decision
    assert d.passed and d.first_model and any("fid: not computed" in r for r in d.reasons)

    doc = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert doc["metrics"]["color_acc"]["value"] == 1.0 and doc["decision"]["passed"] is True
    assert doc["config"]["evaluation"]["generated_samples"] == 20 and doc["config"]["run"] == {"preset": "demo"}
    # the grid: the first 3 distinct held-out captions × seeds [0, 5]; column j is generate(prompts, seed_j)
    prompts = list(dict.fromkeys(held_out.captions))[:3]
    assert doc["samples"] == {"prompts": prompts, "seeds": [0, 5]}
    assert "Gate PASSED" in (tmp_path / "report" / "report.html").read_text()


def test_a_model_that_draws_nothing_fails_against_the_oracle_champion(tmp_path, held_out, offline_home):
    champion = evaluate(
        str(tmp_path / "champion"),
        generate_fn=oracle_generate,
        reconstruct_fn=lambda x: x.copy(),
        held_out=held_out,
        config=CONFIG,
    )
    champion_metrics = json.loads((tmp_path / "champion" / "metrics.json").read_text())["metrics"]
    result = evaluate(
        str(tmp_path / "candidate"),
        generate_fn=blank_generate,
        reconstruct_fn=lambda x: x.copy(),
        held_out=held_out,
        config=CONFIG,
        champion_metrics=champion_metrics,
        champion_label="ldm v1",
    )
    assert champion.decision.passed
    assert result.metrics["color_acc"].value == 0.0 and result.metrics["shape_acc"].value == 0.0
    d = result.decision
    assert not d.passed and not d.first_model
    assert "color_acc = 0 is below the minimum 0.9 (short by 0.9)" in d.reasons
    assert "color_acc = 0 is worse than the champion's 1 by 1 (higher is better; tolerance 0.02)" in d.reasons
    page = (tmp_path / "candidate" / "report.html").read_text()
    assert "Gate FAILED" in page and "compared with the champion ldm v1" in page


def test_bundle_functions_reconstruct_through_the_autoencoder_posterior_mean():
    torch.manual_seed(0)
    vae = build_autoencoder(autoencoder_preset("tiny")).eval()
    model = SimpleNamespace(vae=vae, generate=lambda prompts, **kw: oracle_generate(prompts, kw["seed"]))
    generate_fn, reconstruct_fn = text_to_image_functions(model, batch_size=2)
    images = oracle_generate(
        ["a small red circle in the center", "a large blue square on the left", "a small green triangle at the top"],
        seed=0,
    )
    recon = reconstruct_fn(images)  # two batches
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        expected = to_uint8(vae.decode_latents(vae.encode_latents(x)))
    assert recon.dtype == np.uint8 and recon.shape == images.shape
    assert np.abs(recon.astype(int) - expected.astype(int)).max() <= 1  # batch-size rounding at most one level
    assert np.array_equal(
        generate_fn(["a small red circle in the center"], 7), oracle_generate(["a small red circle in the center"], 7)
    )
