"""`evaluation_report`: metrics, a self-contained HTML report and the promotion gate; moves alias `champion`.

The alias moves by compare-and-swap (`pipeline.promotion`): a gate that finds another gate promoted meanwhile judges its
candidate again against the new champion before it moves the alias. The gate's verdict is also the asset check
`promotion_gate` (severity WARN): a failed gate shows on the asset while the report itself is materialized."""

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import torch

from ldm_core import storage as ldm_storage
from ldm_core.bundle import load_text_to_image
from ldm_core.data import ImageShardDataset
from ldm_core.evaluation.attributes import confusion_lines
from ldm_core.evaluation.evaluate import (
    EvaluationConfig,
    evaluate,
    held_out_from_dataset,
    measure,
    text_to_image_functions,
)
from ldm_core.grids import to_uint8
from ldm_core.models.denoiser import backbone_summary, describe_backbone
from pipeline.asset_common import GPU_ASSET
from pipeline.config_bridge import to_core
from pipeline.defs.evaluation_report.config import EvaluationReportConfig
from pipeline.defs.evaluation_report.record import EvaluationReportRecord
from pipeline.defs.image_dataset.record import ImageDatasetRecord
from pipeline.defs.ldm_model.record import REGISTERED_NAME, LdmModelRecord
from pipeline.defs.vae_model.record import VaeModelRecord
from pipeline.mlflow_models import download_text_to_image
from pipeline.promotion import METRICS_TAG, Champion, Promotion, promote, read_champion_for_gate
from pipeline.promotion_lock import storage_lock
from pipeline.resources import ComputeResource, MLflowResource, StorageResource, TrackedRun
from pipeline.tracking import temp_dir
from pipeline.upstream import lineage_metadata, read_upstream
from pipeline.validation import RunConfigCheck

HELD_OUT_DATASET = "image_dataset"  # the MLflow dataset name of the held-out split (its digest: the dataset version)
GATE_CHECK = "promotion_gate"

LOSS_KEYS = {"vae_model": ("rec", "nll", "kl", "g", "d_loss"), "ldm_model": ("loss",)}


def _loss_curves(client, runs: dict[str, str]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for stage, run_id in runs.items():
        for key in LOSS_KEYS[stage]:
            hist = client.get_metric_history(run_id, key)
            if hist:
                curves.setdefault(stage, {})[key] = [
                    (float(m.step), float(m.value)) for m in sorted(hist, key=lambda m: m.step)
                ]
    return curves


@dataclass(frozen=True)
class _HeldOut:
    """The held-out images (and natural-photo crops) every model of this evaluation is measured on."""

    images: Any
    photos: torch.Tensor | None


def _held_out(config: EvaluationReportConfig, ds: ImageDatasetRecord, resolution: int) -> _HeldOut:
    images = held_out_from_dataset(
        ImageShardDataset(ds.dataset_url, split="validation", resolution=resolution), config.held_out_images
    )
    photos = None
    if config.photo_images and ds.photos_url:
        pds = ImageShardDataset(ds.photos_url, split=None, resolution=resolution)
        photos = to_uint8(pds.get_batch(list(range(min(len(pds), config.photo_images))))) if len(pds) else None
    return _HeldOut(images, photos)


@dataclass(frozen=True)
class _Measurer:
    """Measures a registered version exactly as the candidate (same held-out rows and seeds) and records its metrics
    on it for the next gate."""

    client: Any
    config: EvaluationReportConfig
    eval_cfg: EvaluationConfig
    held_out: _HeldOut
    device: str

    def __call__(self, version: str) -> dict:
        with temp_dir() as tmp:
            other = download_text_to_image(f"models:/{REGISTERED_NAME}/{version}", tmp)
            generate, reconstruct = text_to_image_functions(
                other, steps=self.config.steps, guidance=self.config.guidance, device=self.device
            )
            measured = measure(
                generate_fn=generate,
                reconstruct_fn=reconstruct,
                held_out=self.held_out.images,
                config=self.eval_cfg,
                device=self.device,
                photos=self.held_out.photos,
            )
        metrics = {k: m.to_dict() for k, m in measured.metrics.items()}
        self.client.set_model_version_tag(REGISTERED_NAME, version, METRICS_TAG, json.dumps(metrics))
        return metrics


def _log_report_files(run: TrackedRun, files: dict[str, str]) -> None:
    """The report's files as run artifacts, read through storage so that they reach MLflow from S3 as from a local
    root."""
    with temp_dir() as tmp:
        for name, url in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(ldm_storage.read_bytes(url))
        run.tracker.log_artifact(tmp, "report")


def _gate_check(promotion: Promotion, ldm_uri: str) -> dg.AssetCheckResult:
    """The gate's verdict as a WARN check: red in the UI when the candidate was not promoted, with the reasons."""
    decision = promotion.decision
    return dg.AssetCheckResult(
        check_name=GATE_CHECK,
        passed=bool(decision.passed),
        severity=dg.AssetCheckSeverity.WARN,
        description=None if decision.passed else f"{ldm_uri} not promoted: " + "; ".join(decision.reasons),
        metadata={
            "candidate": ldm_uri,
            "promotion": promotion.describe(),
            "gate_reasons": dg.MetadataValue.json(decision.reasons),
            "compared_with": dg.MetadataValue.json(promotion.compared_with),
        },
    )


@dataclass(frozen=True)
class _Evaluation:
    """The candidate and what it is measured on."""

    config: EvaluationReportConfig
    eval_cfg: EvaluationConfig
    ldm: LdmModelRecord
    ds: ImageDatasetRecord
    model: Any
    """The candidate's text-to-image bundle."""
    backbone: dict[str, Any]
    held_out: _HeldOut
    device: str


def _evaluate(
    context: dg.AssetExecutionContext,
    ev: _Evaluation,
    out_url: str,
    champion: Champion,
    champion_label: str | None,
    loss_curves: dict[str, Any],
) -> Any:
    """The candidate measured on the held-out set, the report written, the gate decided against ``champion``."""
    generate_fn, reconstruct_fn = text_to_image_functions(
        ev.model, steps=ev.config.steps, guidance=ev.config.guidance, device=ev.device
    )
    return evaluate(
        out_url,
        generate_fn=generate_fn,
        reconstruct_fn=reconstruct_fn,
        held_out=ev.held_out.images,
        config=ev.eval_cfg,
        champion_metrics=champion.metrics,
        champion_label=champion_label,
        loss_curves=loss_curves,
        run_config={
            "ldm_uri": ev.ldm.ldm_uri,
            "vae_uri": ev.ldm.vae_uri,
            "dataset": ev.ds.dataset_url,
            "dagster_run_id": context.run.run_id,
        },
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        device=ev.device,
        photos=ev.held_out.photos,
        model=ev.backbone,
    )


def _log_inputs(run: TrackedRun, ev: _Evaluation, champion_label: str | None, measure_champion: bool) -> None:
    run.tracker.log_params(
        {
            "ldm_uri": ev.ldm.ldm_uri,
            "champion_before": champion_label or "none",
            "champion_measured_again": measure_champion,
            "backbone": describe_backbone(ev.backbone),
            "guidance": ev.config.guidance,
            "steps": ev.config.steps,
            **ev.eval_cfg.to_dict(),
        }
    )
    run.log_dataset(
        name=HELD_OUT_DATASET,
        url=ev.ds.dataset_url,
        digest=ev.ds.dataset_version,
        context="evaluation",
        model_id=ev.ldm.mlflow_model_id,
    )


def _log_metrics(run: TrackedRun, ev: _Evaluation, values: dict[str, float]) -> None:
    run.tracker.log_metrics(values, step=0)
    if ev.ldm.mlflow_model_id:  # the same numbers on the logged model itself, tied to the held-out data measured
        run.log_model_metrics(
            values,
            model_id=ev.ldm.mlflow_model_id,
            dataset_name=HELD_OUT_DATASET,
            dataset_digest=ev.ds.dataset_version,
        )


def _promote(
    client: Any,
    storage: StorageResource,
    ldm: LdmModelRecord,
    result: Any,
    champion: Champion,
    eval_cfg: EvaluationConfig,
    measure_registered: _Measurer,
) -> Promotion:
    """The candidate's metrics recorded on it, then the alias moved by compare-and-swap if the gate passes."""
    # recorded before the move: a gate that finds this candidate champion judges its own against these
    client.set_model_version_tag(REGISTERED_NAME, str(ldm.ldm_version), METRICS_TAG, json.dumps(result.report.metrics))
    return promote(
        client,
        REGISTERED_NAME,
        str(ldm.ldm_version),
        result.report.metrics,
        judged_against=champion,
        decision=result.decision,
        gate=eval_cfg.gate,
        lock=storage_lock(storage.resolved_root(), f"promotion-{REGISTERED_NAME}"),
        measure=measure_registered,
    )


def _materialize_result(
    promotion: Promotion,
    champion_label: str | None,
    ldm: LdmModelRecord,
    result: Any,
    values: dict[str, float],
    backbone: dict[str, Any],
    run_url: str,
    lineage: dict[str, str],
) -> dg.MaterializeResult:
    decision = promotion.decision
    record = EvaluationReportRecord(
        ldm_uri=ldm.ldm_uri,
        report_html=result.report.html_url,
        metrics_json=result.report.metrics_url,
        gate_passed=bool(decision.passed),
        gate_reasons=list(decision.reasons),
        promotion=promotion.describe(),
        champion_before=champion_label or "none",
        champion_after=f"{REGISTERED_NAME} v{after}" if (after := promotion.champion_after) else "none",
    )
    return dg.MaterializeResult(
        metadata={
            **{k: dg.MetadataValue.float(float(v)) for k, v in values.items()},
            **record.to_metadata(),
            "gate_compared_with": dg.MetadataValue.json(promotion.compared_with),
            "not_computed": dg.MetadataValue.json({k: m.reason for k, m in result.metrics.items() if not m.computed}),
            "summary": dg.MetadataValue.md(result.report.markdown),
            "color_confusions": dg.MetadataValue.json(confusion_lines(result.color_confusion or {})),
            "backbone": describe_backbone(backbone),
            "mlflow_run": dg.MetadataValue.url(run_url),
            **lineage,
        },
        check_results=[_gate_check(promotion, ldm.ldm_uri)],
    )


@dg.asset(
    **GPU_ASSET,
    deps=["image_dataset", "vae_model", "ldm_model"],
    kinds={"html", "mlflow"},
    description=__doc__,
    check_specs=[
        dg.AssetCheckSpec(
            GATE_CHECK,
            asset="evaluation_report",
            description="The candidate passed the promotion gate (thresholds, and the champion where there is one) "
            "and became the champion. WARN: the report is materialized either way.",
        )
    ],
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    config: EvaluationReportConfig,
    mlflow: MLflowResource,
    storage: StorageResource,
    compute: ComputeResource,
    run_config_check: RunConfigCheck,
) -> dg.MaterializeResult:
    # it reads all three (the LDM, the held-out images, the autoencoder's run): lineage says which materializations
    ldm_read = read_upstream(context, LdmModelRecord)
    ds_read = read_upstream(context, ImageDatasetRecord)
    vae_read = read_upstream(context, VaeModelRecord)
    ldm, ds, vae = ldm_read.record, ds_read.record, vae_read.record
    lineage = lineage_metadata(ldm_read, ds_read, vae_read)
    eval_cfg = to_core(EvaluationConfig, config.evaluation, "evaluation_report.evaluation")
    device = compute.torch_device()
    model = load_text_to_image(ldm.ldm_url)
    backbone = model.info.get("backbone") or backbone_summary(model.denoiser.config)
    held_out = _held_out(config, ds, model.latent_shape[1] * model.vae.config.downsample_factor)
    ev = _Evaluation(config, eval_cfg, ldm, ds, model, backbone, held_out, device)
    client = mlflow.client()
    # a registry error raises here and the step is retried: it never passes for "no champion"
    champion = read_champion_for_gate(client, REGISTERED_NAME)
    measure_champion = champion.version is not None and champion.metrics is None
    champion_label = f"{REGISTERED_NAME} {champion.label}" if champion.version is not None else None
    measure_registered = _Measurer(client, config, eval_cfg, held_out, device)
    runs = {stage: run_id for stage, run_id in (("vae_model", vae.mlflow_run_id), ("ldm_model", ldm.mlflow_run_id))}
    out_url = storage.url("reports", f"ldm-v{ldm.ldm_version}-{context.run.run_id[:8]}")

    with mlflow.materialization_run(context, system_metrics=True) as run:
        _log_inputs(run, ev, champion_label, measure_champion)
        if measure_champion:
            # its metrics tag is gone (deleted, or a version promoted by hand): measure it again exactly as the
            # candidate, on the same held-out rows and seeds, rather than judge the candidate on thresholds alone
            context.log.warning(f"champion {champion_label} has no {METRICS_TAG} tag: measuring it again")
            champion = Champion(champion.version, measure_registered(champion.version))
        result = _evaluate(context, ev, out_url, champion, champion_label, _loss_curves(client, runs))
        values = {k: m.value for k, m in result.metrics.items() if m.computed}
        _log_metrics(run, ev, values)
        _log_report_files(run, result.report.files)
        promotion = _promote(client, storage, ldm, result, champion, eval_cfg, measure_registered)
        decision = promotion.decision
        run.tracker.set_tags(
            {"ldm_uri": ldm.ldm_uri, "gate_passed": str(decision.passed).lower(), "promotion": promotion.describe()}
        )
        if promotion.outcome == "promoted":
            context.log.info(f"gate passed ({promotion.describe()}): alias champion → {ldm.ldm_uri}")
        else:
            context.log.warning(f"champion unchanged ({promotion.describe()}): " + "; ".join(decision.reasons))
        return _materialize_result(promotion, champion_label, ldm, result, values, backbone, run.url, lineage)
