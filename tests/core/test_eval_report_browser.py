"""The report renders in a real browser, offline: headless Chromium shows the metrics table and the sample grid.

CI installs Debian's ``chromium``; where it is absent this test is skipped, saying so.
"""

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_core.data.synthetic import render_shape, shape_specs
from ldm_core.evaluation.metrics import MetricResult, psnr, ssim
from ldm_core.evaluation.report import ReportInputs, SampleGrid, write_report
from ldm_core.grids import upscale_nearest

WINDOW = (1200, 2000)  # width, height of the screenshot
# Per-channel slack when looking for a sample's pixels in the screenshot (PNG decode and compositing are exact in
# practice; the slack only guards against a colour-managed build).
PIXEL_TOLERANCE = 8


def find_chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def run_chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


class MetricsTable(HTMLParser):
    """The rows (cell texts) of the table with id="metrics" in a DOM dump."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self._in, self._row, self._cell = False, None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table" and dict(attrs).get("id") == "metrics":
            self._in = True
        elif self._in and tag == "tr":
            self._row = []
        elif self._row is not None and tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._in = False
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append(" ".join(self._cell.split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def locate(screenshot: np.ndarray, tile: np.ndarray) -> tuple[int, int] | None:
    """Top-left (y, x) where ``tile`` appears in ``screenshot`` (within PIXEL_TOLERANCE), or None."""
    s, t = screenshot.astype(np.int16), tile.astype(np.int16)
    th, tw = t.shape[:2]
    h, w = s.shape[0] - th + 1, s.shape[1] - tw + 1
    cy, cx = th // 2, tw // 2
    # candidates: the tile's corner and centre pixels both match; then compare the whole tile
    ok = (np.abs(s[:h, :w] - t[0, 0]).max(-1) <= PIXEL_TOLERANCE) & (
        np.abs(s[cy : cy + h, cx : cx + w] - t[cy, cx]).max(-1) <= PIXEL_TOLERANCE
    )
    for y, x in np.argwhere(ok):
        if np.abs(s[y : y + th, x : x + tw] - t).max() <= PIXEL_TOLERANCE:
            return int(y), int(x)
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("chromium is not installed (CI installs Debian's 'chromium'; locally: apt-get install -y chromium)")
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    specs = shape_specs(8, seed=11)
    images = np.stack([np.asarray(render_shape(s, 32)) for s in specs])  # real dataset images, (8, 32, 32, 3)
    recon = np.clip(images.astype(int) + np.random.default_rng(0).integers(-12, 13, images.shape), 0, 255)
    recon = recon.astype(np.uint8)
    grid = SampleGrid.from_flat([s.caption for s in specs[::2]], [0, 1], images)  # 4 prompts × 2 seeds
    metrics = {
        "psnr": psnr(images, recon),
        "ssim": ssim(images, recon),
        "fid": MetricResult.not_computed("fid", "weights-inception-2015-12-05-6726825d.pth is missing"),
    }
    out = tmp_path_factory.mktemp("report")
    inputs = ReportInputs(
        metrics=metrics,
        samples=grid,
        originals=images[:4],
        reconstructions=recon[:4],
        loss_curves={"autoencoder": {"loss": [(s, 1 / (1 + s)) for s in range(200)]}},
        config={"preset": "demo"},
        created_at="test",
    )
    write_report(str(out), inputs)
    return out / "report.html", grid, metrics


def test_chromium_shows_the_metrics_table(chromium, report, tmp_path):
    page, _, metrics = report
    done = run_chromium(chromium, tmp_path / "profile", "--dump-dom", page.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    table = MetricsTable()
    table.feed(done.stdout)
    assert table.rows[0] == ["metric", "value", "n (images)", "notes"]
    rows = {r[0].split()[0]: r for r in table.rows[1:]}
    assert set(rows) == {"psnr", "ssim", "fid"}
    assert rows["psnr"][1] == f"{metrics['psnr'].value:.4g}" and rows["psnr"][2] == "8"
    assert rows["fid"][1] == "not computed" and "weights-inception-2015-12-05-6726825d.pth" in rows["fid"][3]


def test_chromium_paints_every_sample_of_the_grid(chromium, report, tmp_path):
    page, grid, _ = report
    shot_path = tmp_path / "shot.png"
    done = run_chromium(chromium, tmp_path / "profile", f"--screenshot={shot_path}", page.as_uri())
    assert done.returncode == 0 and shot_path.exists(), done.stderr[-2000:]
    shot = np.asarray(Image.open(shot_path).convert("RGB"))
    assert shot.shape[:2] == (WINDOW[1], WINDOW[0])
    assert shot.reshape(-1, 3).std(axis=0).max() > 10  # not a blank page

    # Each 32×32 sample is shown at 64×64 with pixelated scaling: find every one, as painted, in the screenshot.
    places = {}
    for i in range(len(grid.prompts)):
        for j in range(len(grid.seeds)):
            where = locate(shot, upscale_nearest(grid.images[i, j], 2))
            assert where is not None, f"sample (prompt {i}, seed {j}) is not visible in the screenshot"
            places[i, j] = where
    # laid out as a grid: prompts go down the rows, seeds across the columns
    for i in range(len(grid.prompts)):
        assert places[i, 0][0] == places[i, 1][0] and places[i, 0][1] < places[i, 1][1]
        if i:
            assert places[i, 0][0] > places[i - 1, 0][0] and places[i, 0][1] == places[i - 1, 0][1]
    # and the painted grid is not uniform: the shapes' colours are there
    top, left = places[0, 0]
    bottom, right = places[len(grid.prompts) - 1, 1]
    region = shot[top : bottom + 64, left : right + 64].reshape(-1, 3).astype(float)
    assert region.std(axis=0).max() > 20
