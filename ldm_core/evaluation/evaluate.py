"""One call from a trained model to a written report and a gate decision (what the `evaluation_report` asset calls).

    1) reconstructions of held-out images through the frozen autoencoder: PSNR, SSIM, LPIPS, rFID
    2) generations from held-out captions (image i from noise seed + i): FID against as many held-out images, and —
       when the rows carry the shapes dataset's attributes — colour / shape / size / position accuracy
    3) a prompt × seed grid of samples
    4) the gate against the champion's metrics
    5) the report (HTML, metrics.json, PNGs)

:func:`measure` is steps 1) and 2) alone: how the gate measures a champion again on the candidate's held-out data.

The model comes in as two plain functions (generate, reconstruct), so the evaluation runs the same on a registered
bundle (:func:`text_to_image_functions`) and on any stand-in a test builds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import Field

from ldm_core.config import StrictModel
from ldm_core.evaluation.attributes import (
    ATTRIBUTES,
    accuracy_metrics,
    attribute_accuracy,
    color_confusion,
    evaluator_accuracy,
)
from ldm_core.evaluation.fid import DEFAULT_FEATURE_DIM, frechet_inception_distance, inception_or_reason
from ldm_core.evaluation.gate import GateConfig, GateDecision, decide
from ldm_core.evaluation.metrics import MetricResult, lpips, psnr, ssim
from ldm_core.evaluation.report import ReportInputs, ReportResult, SampleGrid, write_report
from ldm_core.grids import to_uint8

GenerateFn = Callable[[Sequence[str], int], np.ndarray]
"""(prompts, seed) -> uint8 (N, H, W, 3); image i is drawn from noise seed + i."""
ReconstructFn = Callable[[np.ndarray], np.ndarray]
"""uint8 (N, H, W, 3) -> their autoencoder reconstructions, uint8 (N, H, W, 3)."""


class EvaluationConfig(StrictModel):
    """What the evaluation measures, on how many images, and how the gate judges it."""

    grid_prompts: list[str] | None = None
    """Prompts of the sample grid (rows); None: the first ``grid_size`` distinct held-out captions."""
    grid_size: int = Field(default=8, ge=1)
    """Rows of the sample grid when its prompts come from the held-out captions."""
    grid_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], min_length=1)
    """Columns of the sample grid: the noise seed of each column."""
    generated_samples: int = Field(default=216, ge=0)
    """Images generated from the first held-out captions (cycled if there are fewer) for FID and attribute accuracy;
    216 covers every combination of the shapes dataset once. 0 disables both."""
    reconstruction_samples: int = Field(default=64, ge=0)
    """Held-out images reconstructed for PSNR, SSIM, LPIPS and rFID. 0 disables them."""
    seed: int = 1000
    """Noise seed of the FID / attribute generations (distinct from the grid's, so the grid is not cherry-picked)."""
    lpips: bool = True
    """Compute LPIPS (needs the VGG16 weights; reported as not computed, with the missing file, if absent)."""
    fid: bool = True
    """Compute FID and rFID (needs the Inception weights; reported as not computed, with the missing file, if
    absent)."""
    fid_feature_dim: int = DEFAULT_FEATURE_DIM
    """Inception feature layer for FID: 2048 is the standard one; smaller ones are only for quick checks."""
    download_weights: bool = True
    """Try to download missing pretrained weights (fails fast offline, then the metric is not computed)."""
    gate: GateConfig = Field(default_factory=GateConfig)
    """Thresholds and champion tolerances of the promotion gate."""
    title: str = "LDM evaluation report"
    """Title of the HTML page."""


@dataclass(frozen=True)
class HeldOut:
    """Held-out rows: images, their captions, and (shapes dataset) their attributes."""

    images: np.ndarray
    """uint8 (N, H, W, 3)."""
    captions: list[str]
    attributes: list[dict[str, str]] | None = None


@dataclass(frozen=True)
class EvaluationResult:
    metrics: dict[str, MetricResult]
    decision: GateDecision
    report: ReportResult
    color_confusion: dict[str, dict[str, int]] | None = None
    """Asked-for colour → colour seen in the generated samples → count (shapes data only)."""


def held_out_from_dataset(dataset: Any, max_items: int) -> HeldOut:
    """The first ``max_items`` rows of an :class:`~ldm_core.data.ImageShardDataset` (usually split="validation")."""
    n = min(len(dataset), max_items)
    indices = list(range(n))
    images = (
        to_uint8(dataset.get_batch(indices))
        if n
        else np.zeros((0, dataset.resolution, dataset.resolution, 3), np.uint8)
    )
    rows = dataset.rows(indices)
    names = [a for a in ATTRIBUTES if a in getattr(dataset, "attribute_names", [])]
    attributes = None
    if names and rows and all(r.get(a) is not None for r in rows for a in names):
        attributes = [{a: r[a] for a in names} for r in rows]
    return HeldOut(images, [r["caption"] for r in rows], attributes)


def text_to_image_functions(
    model: Any,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> tuple[GenerateFn, ReconstructFn]:
    """(generate, reconstruct) for a :class:`ldm_core.bundle.TextToImage`."""

    def generate_fn(prompts: Sequence[str], seed: int) -> np.ndarray:
        return model.generate(
            list(prompts), seed=seed, steps=steps, guidance=guidance, batch_size=batch_size, device=device
        )

    @torch.inference_mode()
    def reconstruct_fn(images: np.ndarray) -> np.ndarray:
        vae = model.vae.to(device).eval()
        out = []
        for start in range(0, len(images), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            x = (chunk.permute(0, 3, 1, 2).float() / 127.5 - 1).to(device)  # (b, H, W, 3) uint8 -> (b, 3, H, W)
            out.append(to_uint8(vae.decode_latents(vae.encode_latents(x))))  # posterior mean, as rFID is defined
        return np.concatenate(out) if out else images[:0].copy()

    return generate_fn, reconstruct_fn


def _cycled(items: Sequence[str], n: int) -> list[str]:
    return [items[i % len(items)] for i in range(n)] if items else []


@dataclass(frozen=True)
class Measurements:
    """What :func:`measure` found: the metrics, and what the report shows beside them."""

    metrics: dict[str, MetricResult]
    originals: np.ndarray | None = None
    """The held-out images that were reconstructed, uint8 (N, H, W, 3) (None when none were)."""
    reconstructions: np.ndarray | None = None
    color_confusion: dict[str, dict[str, int]] | None = None


def measure(
    *,
    generate_fn: GenerateFn,
    reconstruct_fn: ReconstructFn | None,
    held_out: HeldOut,
    config: EvaluationConfig | None = None,
    device: str | torch.device = "cpu",
    photos: np.ndarray | None = None,
) -> Measurements:
    """Steps 1) and 2): the metrics of one model on ``held_out``. Two models measured with the same held-out rows,
    photos and config are measured alike (same images, captions and noise seeds), which is what the gate compares."""
    config = config or EvaluationConfig()
    metrics: dict[str, MetricResult] = {}
    n_rec = min(config.reconstruction_samples, len(held_out.images)) if reconstruct_fn is not None else 0
    n_gen = config.generated_samples if held_out.captions else 0
    confusion = None
    # loaded once for rFID and FID (or the reason it cannot be, reported for both)
    inception, inception_missing = (
        inception_or_reason(config.fid_feature_dim, config.download_weights, device)
        if config.fid and (n_rec or n_gen)
        else (None, "disabled in the evaluation config")
    )

    # 1) reconstructions
    originals = held_out.images[:n_rec]
    reconstructions = reconstruct_fn(originals) if n_rec else None
    if reconstructions is not None:
        metrics["psnr"] = psnr(originals, reconstructions)
        metrics["ssim"] = ssim(originals, reconstructions)
        metrics["lpips"] = (
            lpips(originals, reconstructions, download=config.download_weights, device=device)
            if config.lpips
            else MetricResult.not_computed("lpips", "disabled in the evaluation config")
        )
        metrics["rfid"] = frechet_inception_distance(
            originals, reconstructions, name="rfid", inception=inception, unavailable_reason=inception_missing
        )

    if photos is not None and len(photos) and reconstruct_fn is not None:
        photo_rec = reconstruct_fn(photos)
        for name, fn in (("photo_psnr", psnr), ("photo_ssim", ssim)):
            r = fn(photos, photo_rec)
            metrics[name] = MetricResult(name, r.value, r.n, r.computed, r.reason, r.capped, r.note)
        if config.lpips:
            r = lpips(photos, photo_rec, download=config.download_weights, device=device)
            metrics["photo_lpips"] = MetricResult("photo_lpips", r.value, r.n, r.computed, r.reason, r.capped, r.note)

    # 2) generations from held-out captions: FID, attribute accuracy
    if n_gen:
        generated = generate_fn(_cycled(held_out.captions, n_gen), config.seed)
        n_real = min(n_gen, len(held_out.images))
        metrics["fid"] = frechet_inception_distance(
            held_out.images[:n_real],
            generated[:n_real],
            name="fid",
            inception=inception,
            unavailable_reason=inception_missing,
        )
        if held_out.attributes is not None:
            wanted = [held_out.attributes[i % len(held_out.attributes)] for i in range(n_gen)]
            accuracy = attribute_accuracy(generated, wanted)
            metrics.update(accuracy_metrics(accuracy))
            confusion = color_confusion(wanted, accuracy["predictions"])
            # the judge judged: its own accuracy on the REAL held-out images, reported beside what it measured
            for name, m in accuracy_metrics(evaluator_accuracy(held_out.images, held_out.attributes)).items():
                metrics[f"evaluator_{name}"] = MetricResult(
                    f"evaluator_{name}", m.value, m.n, m.computed, m.reason, note="evaluator on real held-out images"
                )
    return Measurements(metrics, originals if reconstructions is not None else None, reconstructions, confusion)


def evaluate(
    out_url: str,
    *,
    generate_fn: GenerateFn,
    reconstruct_fn: ReconstructFn | None,
    held_out: HeldOut,
    config: EvaluationConfig | None = None,
    champion_metrics: Mapping[str, Any] | None = None,
    champion_label: str | None = None,
    loss_curves: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]] | None = None,
    run_config: Mapping[str, Any] | None = None,
    created_at: str | None = None,
    device: str | torch.device = "cpu",
    storage_options: dict[str, Any] | None = None,
    photos: np.ndarray | None = None,
    model: Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """Measure, decide, and write the report under ``out_url``. ``champion_metrics`` None means a first model.

    photos: natural-image crops (uint8 (N, H, W, 3)) also reconstructed, reported as photo_psnr/ssim/lpips.
    model: the denoiser under evaluation (`backbone_summary`), which the report names.
    """
    config = config or EvaluationConfig()
    measured = measure(
        generate_fn=generate_fn,
        reconstruct_fn=reconstruct_fn,
        held_out=held_out,
        config=config,
        device=device,
        photos=photos,
    )
    metrics = measured.metrics

    # 3) the prompt × seed grid: column j is generate(prompts, seed_j), so row i's noise is seed_j + i
    prompts = config.grid_prompts or list(dict.fromkeys(held_out.captions))[: config.grid_size]
    samples = None
    if prompts:
        columns = [generate_fn(prompts, seed) for seed in config.grid_seeds]  # each (P, H, W, 3)
        samples = SampleGrid(prompts, config.grid_seeds, np.stack(columns, axis=1))  # (P, S, H, W, 3)

    # 4) the gate, 5) the report
    decision = decide(metrics, champion_metrics, config.gate)
    inputs = ReportInputs(
        metrics=metrics,
        samples=samples,
        originals=measured.originals,
        reconstructions=measured.reconstructions,
        loss_curves=loss_curves,
        config={"evaluation": config.to_dict(), "run": dict(run_config) if run_config is not None else None},
        champion_metrics=champion_metrics,
        champion_label=champion_label,
        decision=decision,
        title=config.title,
        created_at=created_at,
        color_confusion=measured.color_confusion,
        model=model,
    )
    report = write_report(out_url, inputs, storage_options)
    return EvaluationResult(metrics, decision, report, measured.color_confusion)


__all__ = [
    "EvaluationConfig",
    "EvaluationResult",
    "GenerateFn",
    "HeldOut",
    "Measurements",
    "ReconstructFn",
    "evaluate",
    "held_out_from_dataset",
    "measure",
    "text_to_image_functions",
]
