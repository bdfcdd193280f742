"""The evaluation report: what it writes, that the page is self-contained, that the embedded images are the
images given, and that it goes to S3 through the same code path."""

import base64
import io
import json
import os
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from ldm_core import storage
from ldm_core.data.synthetic import render_shape, shape_specs
from ldm_core.evaluation.gate import GateConfig, MetricRule, decide
from ldm_core.evaluation.metrics import MetricResult, psnr
from ldm_core.evaluation.report import (
    HTML_NAME,
    METRICS_NAME,
    RECONSTRUCTIONS_NAME,
    SAMPLES_NAME,
    ReportInputs,
    SampleGrid,
    collect_versions,
    reconstruction_image,
    sample_grid_image,
    svg_line_chart,
    write_report,
)

LPIPS_REASON = "Pretrained weights 'vgg16' are missing: expected the file 'vgg16-397923af.pth' in the directory '/x'"


class PageParser(HTMLParser):
    """Collects every tag, every URL-bearing attribute, the <img> sources and the text of the metrics table."""

    def __init__(self):
        super().__init__()
        self.tags, self.urls, self.images, self.polylines = [], [], [], []
        self.metric_rows: list[list[str]] = []
        self._in_metrics = False
        self._row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href", "xlink:href", "data", "poster", "action") and v]
        if tag == "img":
            self.images.append(a)
        if tag == "polyline":
            self.polylines.append(a["points"])
        if tag == "table" and a.get("id") == "metrics":
            self._in_metrics = True
        if self._in_metrics and tag == "tr":
            self._row = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_metrics = False
        if tag == "tr" and self._row is not None:
            self.metric_rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._row is not None and data.strip():
            self._row.append(data.strip())


def decode_data_uri(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


@pytest.fixture(scope="module")
def inputs():
    specs = shape_specs(6, seed=5)
    images = np.stack([np.asarray(render_shape(s, 32)) for s in specs])  # (6, 32, 32, 3)
    recon = np.clip(images.astype(int) + np.random.default_rng(0).integers(-20, 21, images.shape), 0, 255)
    recon = recon.astype(np.uint8)
    grid = SampleGrid.from_flat([specs[0].caption, specs[1].caption, "a <b>bold</b> & odd prompt"], [0, 7], images)
    metrics = {
        "psnr": psnr(images, recon),
        "color_acc": MetricResult("color_acc", 0.75, 6),
        "lpips": MetricResult.not_computed("lpips", LPIPS_REASON),
    }
    champion = {"psnr": MetricResult("psnr", 40.0, 6), "color_acc": MetricResult("color_acc", 0.5, 6)}
    config = GateConfig(
        rules={
            "psnr": MetricRule(higher_is_better=True, tolerance=0.1),
            "color_acc": MetricRule(higher_is_better=True, min=0.7),
        }
    )
    decision = decide(metrics, champion, config)
    curves = {
        "autoencoder": {
            "loss/rec": [(s, 1.0 / (1 + s)) for s in range(0, 500, 5)],
            "loss/disc": [(s, 0.7) for s in range(100)],
        },
        "ldm": {"loss/mse": [(s, 0.2 + 0.8 * 0.99**s) for s in range(1000)]},
    }
    return dict(
        images=images, recon=recon, grid=grid, metrics=metrics, champion=champion, decision=decision, curves=curves
    )


def write(out_url, inputs, **overrides):
    kwargs = dict(
        metrics=inputs["metrics"],
        samples=inputs["grid"],
        originals=inputs["images"][:4],
        reconstructions=inputs["recon"][:4],
        loss_curves=inputs["curves"],
        config={"preset": "demo", "vae": {"lr": 4.5e-6}},
        champion_metrics=inputs["champion"],
        champion_label="ldm v3",
        decision=inputs["decision"],
        created_at="2025-06-01T12:00:00Z",
        versions={"torch": "9.9", "ldm-pipeline": "0.1.0"},
    )
    kwargs.update(overrides)
    return write_report(out_url, ReportInputs(**kwargs))


def test_report_writes_all_files_and_metrics_json_round_trips(tmp_path, inputs):
    out = str(tmp_path / "reports" / "run1")
    result = write(out, inputs)
    assert set(result.files) == {HTML_NAME, METRICS_NAME, SAMPLES_NAME, RECONSTRUCTIONS_NAME}
    assert result.html_url == os.path.join(out, HTML_NAME)
    assert sorted(os.listdir(out)) == sorted(result.files)  # nothing else (no temp files left behind)

    doc = json.loads((tmp_path / "reports" / "run1" / METRICS_NAME).read_text())
    assert doc["metrics"]["psnr"]["value"] == pytest.approx(inputs["metrics"]["psnr"].value)
    assert doc["metrics"]["psnr"]["n"] == 6
    assert doc["metrics"]["lpips"] == {
        "name": "lpips",
        "value": None,
        "n": 0,
        "computed": False,
        "reason": LPIPS_REASON,
        "capped": False,
        "note": None,
    }
    assert doc["metrics"] == result.metrics
    assert doc["decision"]["passed"] is False and doc["decision"]["reasons"][0].startswith("psnr = ")
    assert doc["champion"]["label"] == "ldm v3" and doc["champion"]["metrics"]["psnr"]["value"] == 40.0
    assert doc["samples"] == {"prompts": list(inputs["grid"].prompts), "seeds": [0, 7]}
    assert doc["config"]["vae"]["lr"] == 4.5e-6 and doc["versions"]["torch"] == "9.9"

    assert np.array_equal(np.asarray(Image.open(result.files[SAMPLES_NAME])), sample_grid_image(inputs["grid"]))
    recon_png = np.asarray(Image.open(result.files[RECONSTRUCTIONS_NAME]))
    assert np.array_equal(recon_png, reconstruction_image(inputs["images"][:4], inputs["recon"][:4]))


def test_page_is_self_contained_and_embeds_the_given_images(tmp_path, inputs):
    write(str(tmp_path), inputs)
    page = (tmp_path / HTML_NAME).read_text(encoding="utf-8")
    parser = PageParser()
    parser.feed(page)
    # nothing to fetch: every URL is an embedded PNG, and there is no script, stylesheet link, font or CSS url()
    assert parser.urls and all(u.startswith("data:image/png;base64,") for u in parser.urls)
    assert not {"script", "link", "iframe", "object", "embed"} & set(parser.tags)
    assert "url(" not in page and "@import" not in page and "@font-face" not in page

    samples = [img for img in parser.images if "sample" in img.get("class", "")]
    grid = inputs["grid"]
    assert len(samples) == len(grid.prompts) * len(grid.seeds)
    for k, img in enumerate(samples):  # row-major: prompt i, seed j
        i, j = divmod(k, len(grid.seeds))
        assert np.array_equal(decode_data_uri(img["src"]), grid.images[i, j])
        assert img["alt"] == f"{grid.prompts[i]}, seed {grid.seeds[j]}"  # the parser unescapes: text survived
    recon = next(img for img in parser.images if img.get("id") == "reconstructions")
    assert np.array_equal(
        decode_data_uri(recon["src"]), reconstruction_image(inputs["images"][:4], inputs["recon"][:4])
    )
    assert "a &lt;b&gt;bold&lt;/b&gt; &amp; odd prompt" in page  # prompts are text, never markup

    rows = {r[0].split()[0]: r for r in parser.metric_rows[1:]}
    assert rows["psnr"][1] == f"{inputs['metrics']['psnr'].value:.4g}" and rows["psnr"][2] == "6"
    assert rows["lpips"][1:3] == ["not computed", "0"] and rows["lpips"][3] == LPIPS_REASON
    assert "Gate FAILED" in page and "compared with the champion ldm v3" in page
    # one chart per loss series, both stages
    assert len(parser.polylines) == 3 and "<h3>autoencoder</h3>" in page and "<h3>ldm</h3>" in page
    assert "&quot;preset&quot;: &quot;demo&quot;" in page and "<td>torch</td><td>9.9</td>" in page


def test_markdown_summary_carries_the_metrics_the_decision_and_the_grid(tmp_path, inputs):
    md = write(str(tmp_path), inputs).markdown
    assert "| psnr | " in md and "| lpips | not computed (Pretrained weights 'vgg16'" in md
    assert "**Gate failed**" in md and "- psnr = " in md
    uri = re.search(r"!\[samples\]\((data:image/png;base64,[A-Za-z0-9+/=]+)\)", md).group(1)
    assert np.array_equal(decode_data_uri(uri), sample_grid_image(inputs["grid"]))


def test_report_without_optional_parts_still_renders(tmp_path):
    result = write_report(str(tmp_path), ReportInputs(metrics={"fid": MetricResult.not_computed("fid", "no weights")}))
    page = (tmp_path / HTML_NAME).read_text()
    assert set(result.files) == {HTML_NAME, METRICS_NAME}
    assert "gate was not run" in page and "No samples" in page and "No reconstructions" in page
    assert json.loads((tmp_path / METRICS_NAME).read_text())["versions"] == collect_versions()


def test_svg_chart_maps_steps_and_values_onto_the_plot_box():
    svg = svg_line_chart([(0, 2.0), (50, 1.0), (100, 0.0)], "loss", width=360, height=180)
    points = re.search(r'points="([^"]+)"', svg).group(1).split()
    # plot box: x from 56 to 350, y from 22 (max value) to 154 (min value)
    assert points == ["56.0,22.0", "203.0,88.0", "350.0,154.0"]
    long = svg_line_chart([(s, float(s)) for s in range(5000)], "long")
    assert len(re.search(r'points="([^"]+)"', long).group(1).split()) <= 401
    assert "no finite values" in svg_line_chart([(0, float("nan"))], "empty")


def test_report_goes_to_s3_through_the_same_code_path(s3_url, inputs):
    result = write(s3_url, inputs)
    assert result.html_url == f"{s3_url}/{HTML_NAME}"
    assert sorted(storage.list_dir(s3_url)) == sorted(result.files)
    doc = json.loads(storage.read_text(result.metrics_url))
    assert doc["metrics"]["color_acc"]["value"] == 0.75
    assert storage.read_text(result.html_url).startswith("<!DOCTYPE html>")
