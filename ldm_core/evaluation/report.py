"""The evaluation report: one self-contained HTML page, ``metrics.json`` and the PNGs, written atomically.

The page embeds everything (images as base64 PNG data URIs, loss curves as inline SVG, CSS inline): it opens
offline, from an e-mail attachment or an S3 console download, exactly as written. It shows the metrics with their
sample sizes and not-computed reasons, the gate's decision against the champion and why, a prompt × seed grid of
samples, reconstructions beside their originals, the training-loss curves of both stages, and the configuration and
package versions that produced it.

Files under ``out_url`` (written in this order, the page last, so a reader that sees the page sees everything):
``samples.png``, ``reconstructions.png``, ``metrics.json``, ``report.html``.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import io
import json
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ldm_core import storage
from ldm_core.evaluation.attributes import confusion_lines
from ldm_core.evaluation.gate import GateDecision
from ldm_core.evaluation.metrics import HIGHER_IS_BETTER, MetricResult, metric_value
from ldm_core.grids import make_grid, upscale_nearest
from ldm_core.models.denoiser import describe_backbone

HTML_NAME = "report.html"
METRICS_NAME = "metrics.json"
SAMPLES_NAME = "samples.png"
RECONSTRUCTIONS_NAME = "reconstructions.png"
# Tiles in the PNG files are blown up (nearest neighbour) to at least this many pixels, so 32×32 samples are visible.
MIN_TILE_PX = 64
# Loss curves are drawn from at most this many points (evenly thinned): enough for the shape, small in the page.
MAX_CURVE_POINTS = 400
# Packages whose versions identify what produced a report.
VERSION_PACKAGES = (
    "ldm-pipeline",
    "torch",
    "torchvision",
    "numpy",
    "scipy",
    "torchmetrics",
    "torch-fidelity",
    "lpips",
    "transformers",
    "diffusers",
    "pillow",
)


@dataclass(frozen=True)
class SampleGrid:
    """Generated samples for each prompt (rows) and seed (columns)."""

    prompts: Sequence[str]
    seeds: Sequence[int]
    images: np.ndarray
    """uint8 (len(prompts), len(seeds), H, W, 3)."""

    def __post_init__(self) -> None:
        shape = np.shape(self.images)
        if len(shape) != 5 or shape[:2] != (len(self.prompts), len(self.seeds)) or shape[-1] != 3:
            raise ValueError(
                f"images must be (prompts={len(self.prompts)}, seeds={len(self.seeds)}, H, W, 3), got {shape}"
            )

    @classmethod
    def from_flat(cls, prompts: Sequence[str], seeds: Sequence[int], images: np.ndarray) -> SampleGrid:
        """From (P·S, H, W, 3) images ordered prompt-major (all seeds of prompt 0, then prompt 1, …)."""
        images = np.asarray(images)
        return cls(prompts, seeds, images.reshape(len(prompts), len(seeds), *images.shape[1:]))


@dataclass(frozen=True)
class ReportResult:
    """Where the report went, what it says, and a markdown summary for Dagster's UI."""

    html_url: str
    metrics_url: str
    files: dict[str, str]
    """Every file written: name -> URL."""
    metrics: dict[str, dict[str, Any]]
    """name -> MetricResult.to_dict() (what metrics.json holds under "metrics")."""
    markdown: str
    decision: GateDecision | None = None


def collect_versions() -> dict[str, str]:
    """Python, platform and the versions of the packages that shape the numbers."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in VERSION_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


# Rendering helpers ---------------------------------------------------------------------------------------------------


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _tile_factor(height: int) -> int:
    return max(1, math.ceil(MIN_TILE_PX / max(height, 1)))


def sample_grid_image(grid: SampleGrid) -> np.ndarray:
    """One PNG-ready (rows = prompts, columns = seeds) image, tiles blown up to ≥ MIN_TILE_PX."""
    p, s, h, w, _ = grid.images.shape
    flat = np.asarray(grid.images, np.uint8).reshape(p * s, h, w, 3)
    return upscale_nearest(make_grid(flat, ncols=s), _tile_factor(h))


def reconstruction_image(originals: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """Originals on the top row, their reconstructions right below, as one image."""
    originals, reconstructions = np.asarray(originals, np.uint8), np.asarray(reconstructions, np.uint8)
    if originals.shape != reconstructions.shape:
        raise ValueError(f"originals {originals.shape} and reconstructions {reconstructions.shape} differ")
    n = len(originals)
    stacked = np.concatenate([originals, reconstructions])  # (2n, H, W, 3): row 0 originals, row 1 reconstructions
    return upscale_nearest(make_grid(stacked, ncols=n), _tile_factor(originals.shape[1]))


def svg_line_chart(points: Sequence[tuple[float, float]], title: str, width: int = 360, height: int = 180) -> str:
    """A dependency-free inline SVG line chart of (step, value) points, with min/max labels on both axes."""
    pts = [(float(x), float(y)) for x, y in points if math.isfinite(float(y))]
    if len(pts) > MAX_CURVE_POINTS:
        stride = math.ceil(len(pts) / MAX_CURVE_POINTS)
        pts = pts[::stride] + ([pts[-1]] if (len(pts) - 1) % stride else [])
    left, right, top, bottom = 56, 10, 22, 26
    pw, ph = width - left - right, height - top - bottom
    esc = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">',
        f'<text x="{left}" y="14" class="chart-title">{esc(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    if not pts:
        parts.append(f'<text x="{left + 8}" y="{top + ph / 2}">no finite values</text></svg>')
        return "".join(parts)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    xspan, yspan = (x1 - x0) or 1.0, (y1 - y0) or max(abs(y0), 1.0)

    def px(x: float) -> float:
        return left + (x - x0) / xspan * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / yspan * ph

    coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
    parts += [
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{coords}"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{y1:.4g}</text>',
        f'<text x="{left - 4}" y="{top + ph}" text-anchor="end">{y0:.4g}</text>',
        f'<text x="{left}" y="{height - 8}">{x0:g}</text>',
        f'<text x="{left + pw}" y="{height - 8}" text-anchor="end">step {x1:g}</text>',
        "</svg>",
    ]
    return "".join(parts)


def _fmt_value(m: Mapping[str, Any]) -> str:
    if not m.get("computed", True) or m.get("value") is None:
        return "not computed"
    v = float(m["value"])
    text = f"{v:.4g}"
    return f"≥ {text} (capped)" if m.get("capped") else text


_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px; color: #222; max-width: 1150px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; font-size: 0.92em; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
#metrics td:first-child, #comparison td:first-child { white-space: nowrap; }
.missing { color: #a33; } .note { color: #666; font-size: 0.85em; }
.pass { background: #e6f4ea; border: 1px solid #5a5; padding: 8px 12px; }
.fail { background: #fce8e6; border: 1px solid #c55; padding: 8px 12px; }
.none { background: #f3f3f3; border: 1px solid #aaa; padding: 8px 12px; }
img.px { image-rendering: pixelated; image-rendering: crisp-edges; }
table.samples td { border: none; padding: 2px; } table.samples td.prompt { max-width: 260px; padding-right: 10px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.chart text { font-size: 11px; fill: #444; } .chart .chart-title { font-size: 12px; fill: #222; font-weight: 600; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 0.85em; }
"""


def _metrics_table(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    rows = []
    for name, m in metrics.items():
        arrow = {True: "↑", False: "↓"}.get(HIGHER_IS_BETTER.get(name), "")
        computed = m.get("computed", True) and m.get("value") is not None
        detail = html.escape(str(m.get("reason") or "")) if not computed else html.escape(str(m.get("note") or ""))
        rows.append(
            f'<tr class="metric" data-metric="{html.escape(name)}"><td>{html.escape(name)} {arrow}</td>'
            f'<td class="num{"" if computed else " missing"}">{html.escape(_fmt_value(m))}</td>'
            f'<td class="num">{int(m.get("n") or 0)}</td>'
            f'<td class="{"note" if computed else "missing"}">{detail}</td></tr>'
        )
    return (
        '<table id="metrics"><thead><tr><th>metric</th><th>value</th><th>n (images)</th><th>notes</th></tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _decision_section(decision: GateDecision | None, champion_label: str | None) -> str:
    if decision is None:
        return '<div class="none" id="decision">The promotion gate was not run for this report.</div>'
    verdict = "PASSED" if decision.passed else "FAILED"
    against = (
        "first model: no champion to compare with"
        if decision.first_model
        else f"compared with the champion {html.escape(champion_label or '')}".rstrip()
    )
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in decision.reasons)
    rows = []
    for c in decision.comparisons:

        def num(v: float | None) -> str:
            return "—" if v is None else f"{v:.4g}"

        threshold = {None: "—", True: "met", False: "missed"}[c.threshold_ok]
        rows.append(
            f"<tr><td>{html.escape(c.metric)} {'↑' if c.higher_is_better else '↓'}</td>"
            f'<td class="num">{num(c.candidate)}</td><td class="num">{num(c.champion)}</td>'
            f'<td class="num">{"—" if c.delta is None else f"{c.delta:+.4g}"}</td>'
            f'<td class="num">{num(c.allowed)}</td><td>{threshold}</td>'
            f"<td>{html.escape(c.verdict)}{(' (' + html.escape(c.note) + ')') if c.note else ''}</td></tr>"
        )
    table = (
        (
            '<table id="comparison"><thead><tr><th>metric</th><th>candidate</th><th>champion</th><th>Δ</th>'
            "<th>allowed worse</th><th>threshold</th><th>verdict</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
        if rows
        else ""
    )
    return (
        f'<div class="{"pass" if decision.passed else "fail"}" id="decision"><strong>Gate {verdict}</strong> '
        f"({against})<ul>{reasons}</ul></div>{table}"
    )


def _samples_section(grid: SampleGrid | None) -> str:
    if grid is None:
        return "<p>No samples were generated for this report.</p>"
    h = grid.images.shape[2]
    shown = h * _tile_factor(h)
    head = "".join(f"<th>seed {int(s)}</th>" for s in grid.seeds)
    rows = []
    for i, prompt in enumerate(grid.prompts):
        cells = "".join(
            f'<td><img class="px sample" width="{shown}" height="{shown}" alt="{html.escape(prompt)}, '
            f'seed {int(s)}" src="{data_uri(png_bytes(grid.images[i, j]))}"></td>'
            for j, s in enumerate(grid.seeds)
        )
        rows.append(f'<tr><td class="prompt">{html.escape(prompt)}</td>{cells}</tr>')
    return (
        f'<table class="samples" id="samples"><thead><tr><th>prompt</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _confusion_section(confusion: Mapping[str, Mapping[str, int]] | None) -> str:
    """Asked-for colour (rows) × colour seen (columns) of the generated samples, misreadings listed above it."""
    if not confusion:
        return "<p>No colour judgements (the held-out data has no colour attribute).</p>"
    seen = sorted({c for row in confusion.values() for c in row} | set(confusion))
    head = "".join(f"<th>seen {html.escape(c)}</th>" for c in seen)
    rows = []
    for wanted, row in confusion.items():
        cells = "".join(
            f'<td class="num{" missing" if c != wanted and row.get(c) else ""}">{row.get(c, 0)}</td>' for c in seen
        )
        rows.append(f"<tr><td>asked {html.escape(wanted)}</td>{cells}</tr>")
    lines = confusion_lines(confusion)
    summary = (
        f'<p class="missing" id="confusions">{html.escape("; ".join(lines))}</p>'
        if lines
        else '<p class="note" id="confusions">Every colour was drawn as asked.</p>'
    )
    return (
        f'{summary}<table id="color-confusion"><thead><tr><th>prompt asked</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _loss_section(loss_curves: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]] | None) -> str:
    if not loss_curves:
        return "<p>No training-loss history was given.</p>"
    out = []
    for stage, series in loss_curves.items():
        charts = "".join(svg_line_chart(points, name) for name, points in series.items())
        out.append(f'<h3>{html.escape(stage)}</h3><div class="charts">{charts or "<p>no series</p>"}</div>')
    return "".join(out)


def _model_line(model: Mapping[str, Any] | None) -> str:
    if model is None:
        return ""
    return f'<p id="model"><strong>Denoiser:</strong> {html.escape(describe_backbone(model))}</p>'


def _markdown(
    metrics: Mapping[str, Mapping[str, Any]],
    decision: GateDecision | None,
    grid_png: bytes | None,
    html_url: str,
    confusion: Mapping[str, Mapping[str, int]] | None = None,
    model: Mapping[str, Any] | None = None,
) -> str:
    lines = [f"**Denoiser:** {describe_backbone(model)}", ""] if model is not None else []
    lines += ["| metric | value | n |", "|---|---|---|"]
    for name, m in metrics.items():
        value = _fmt_value(m)
        if value == "not computed":
            value += f" ({str(m.get('reason') or '')[:160]})"
        lines.append(f"| {name} | {value.replace('|', '/')} | {int(m.get('n') or 0)} |")
    if decision is not None:
        lines += [
            "",
            f"**Gate {'passed' if decision.passed else 'failed'}**"
            + (" (first model)" if decision.first_model else "")
            + ":",
        ]
        lines += [f"- {r}" for r in decision.reasons]
    if confusion and (wrong := confusion_lines(confusion)):
        lines += ["", "Colours drawn wrong: " + "; ".join(wrong)]
    if grid_png is not None:
        lines += ["", f"![samples]({data_uri(grid_png)})"]
    lines += ["", f"Full report: `{html_url}`"]
    return "\n".join(lines)


# The report ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportInputs:
    """What a report shows: the measurements, the gate's inputs and decision, and what produced them. Only
    ``metrics`` is required; each part left out is said to be missing on the page."""

    metrics: Mapping[str, MetricResult]
    """name -> result (attribute accuracies, PSNR, SSIM, LPIPS, rFID, FID, …)."""
    samples: SampleGrid | None = None
    """The prompt × seed grid."""
    originals: np.ndarray | None = None
    """uint8 (N, H, W, 3), shown above ``reconstructions``, their pairs."""
    reconstructions: np.ndarray | None = None
    loss_curves: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]] | None = None
    """stage -> series -> [(step, value)] (e.g. the trainers' ``history``)."""
    config: Mapping[str, Any] | None = None
    """The run configuration as plain data."""
    versions: Mapping[str, str] | None = None
    """Package versions; None collects this process's (`collect_versions`)."""
    champion_metrics: Mapping[str, Any] | None = None
    """The gate's input: the champion's metrics, as results, their dicts or bare values."""
    champion_label: str | None = None
    decision: GateDecision | None = None
    title: str = "LDM evaluation report"
    created_at: str | None = None
    """A timestamp string supplied by the caller (no clock in here)."""
    color_confusion: Mapping[str, Mapping[str, int]] | None = None
    """Asked-for colour → colour seen → count, of the generated samples."""
    model: Mapping[str, Any] | None = None
    """The denoiser under evaluation (`ldm_core.models.denoiser.backbone_summary`: kind, preset, size,
    parameters), named at the top of the page and the summary and kept in metrics.json."""


def write_report(out_url: str, inputs: ReportInputs, storage_options: dict[str, Any] | None = None) -> ReportResult:
    """Write the report of ``inputs`` under ``out_url`` (any fsspec URL) and return where it went and what it says.
    The files go in the module doc's order, the page last."""
    versions = dict(inputs.versions) if inputs.versions is not None else collect_versions()
    metrics_dicts = {name: m.to_dict() for name, m in inputs.metrics.items()}
    files: dict[str, str] = {}

    def write_png(name: str, image: np.ndarray) -> bytes:
        data = png_bytes(image)
        files[name] = storage.join(out_url, name)
        storage.write_bytes_atomic(files[name], data, storage_options)
        return data

    grid_png = write_png(SAMPLES_NAME, sample_grid_image(inputs.samples)) if inputs.samples is not None else None
    recon_png = None
    if inputs.originals is not None and inputs.reconstructions is not None and len(inputs.originals):
        recon_png = write_png(RECONSTRUCTIONS_NAME, reconstruction_image(inputs.originals, inputs.reconstructions))

    files[METRICS_NAME] = storage.join(out_url, METRICS_NAME)
    document = _metrics_document(inputs, metrics_dicts, versions)
    # allow_nan=False: a non-finite number would make the file unreadable to strict JSON parsers; metrics are capped
    storage.write_text_atomic(
        files[METRICS_NAME], json.dumps(document, indent=2, allow_nan=False, default=str), storage_options
    )
    files[HTML_NAME] = storage.join(out_url, HTML_NAME)
    storage.write_text_atomic(files[HTML_NAME], _page(inputs, metrics_dicts, versions, recon_png), storage_options)
    markdown = _markdown(
        metrics_dicts, inputs.decision, grid_png, files[HTML_NAME], inputs.color_confusion, inputs.model
    )
    return ReportResult(files[HTML_NAME], files[METRICS_NAME], files, metrics_dicts, markdown, inputs.decision)


def _champion_dicts(champion_metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The champion's metrics as metrics.json holds them, whether given as results, their dicts or bare values."""
    return {
        k: (v.to_dict() if isinstance(v, MetricResult) else v if isinstance(v, Mapping) else {"value": metric_value(v)})
        for k, v in champion_metrics.items()
    }


def _metrics_document(
    inputs: ReportInputs, metrics_dicts: dict[str, dict[str, Any]], versions: dict[str, str]
) -> dict[str, Any]:
    """What metrics.json holds."""
    samples, decision, model = inputs.samples, inputs.decision, inputs.model
    champion_dicts = _champion_dicts(inputs.champion_metrics) if inputs.champion_metrics is not None else None
    return {
        "title": inputs.title,
        "created_at": inputs.created_at,
        "metrics": metrics_dicts,
        "decision": decision.to_dict() if decision is not None else None,
        "champion": (
            {"label": inputs.champion_label, "metrics": champion_dicts} if champion_dicts is not None else None
        ),
        "samples": (
            {"prompts": list(samples.prompts), "seeds": [int(s) for s in samples.seeds]}
            if samples is not None
            else None
        ),
        "color_confusion": inputs.color_confusion,
        "model": dict(model) if model is not None else None,
        "config": inputs.config,
        "versions": versions,
    }


def _page(
    inputs: ReportInputs, metrics_dicts: dict[str, dict[str, Any]], versions: dict[str, str], recon_png: bytes | None
) -> str:
    """The HTML page, everything embedded."""
    esc, title, config = html.escape, inputs.title, inputs.config
    recon_html = (
        f'<img class="px" id="reconstructions" alt="originals (top) and reconstructions (bottom)" '
        f'src="{data_uri(recon_png)}"><p class="note">Top: originals. Bottom: reconstructions.</p>'
        if recon_png is not None
        else "<p>No reconstructions were given.</p>"
    )
    config_json = json.dumps(config, indent=2, default=str) if config is not None else "(none given)"
    versions_rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in versions.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="note">{esc(inputs.created_at or "")}</p>
{_model_line(inputs.model)}
<h2>Promotion gate</h2>
{_decision_section(inputs.decision, inputs.champion_label)}
<h2>Metrics</h2>
{_metrics_table(metrics_dicts)}
<h2>Colours of the generated samples</h2>
{_confusion_section(inputs.color_confusion)}
<h2>Samples (prompt × seed)</h2>
{_samples_section(inputs.samples)}
<h2>Reconstructions</h2>
{recon_html}
<h2>Training losses</h2>
{_loss_section(inputs.loss_curves)}
<h2>Configuration</h2>
<pre id="config">{esc(config_json)}</pre>
<h2>Versions</h2>
<table id="versions"><tbody>{versions_rows}</tbody></table>
</body></html>
"""


__all__ = [
    "ReportInputs",
    "ReportResult",
    "SampleGrid",
    "collect_versions",
    "data_uri",
    "reconstruction_image",
    "sample_grid_image",
    "svg_line_chart",
    "write_report",
]
