"""`evaluation_report`: metrics, a self-contained HTML report and the promotion gate; moves alias `champion`.

The alias moves by compare-and-swap (`pipeline.promotion`): a gate that finds another gate promoted meanwhile judges its
candidate again against the new champion before it moves the alias."""

import json
import os
from datetime import UTC, datetime

import dagster as dg

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
from pipeline.asset_config import EvaluationReportConfig
from pipeline.assets.common import GPU_OP_TAGS, GPU_POOL, GPU_RETRY_POLICY, GROUP
from pipeline.assets.ldm_model import REGISTERED_NAME
from pipeline.assets.upstream import lineage_metadata, read_upstream
from pipeline.config_bridge import to_core
from pipeline.mlflow_models import download_text_to_image
from pipeline.promotion import METRICS_TAG, Champion, promote, read_champion_for_gate
from pipeline.promotion_lock import storage_lock
from pipeline.resources import ComputeResource, MLflowResource, StorageResource
from pipeline.tracking import temp_dir
from pipeline.validation import RunConfigCheck

HELD_OUT_DATASET = "image_dataset"  # the MLflow dataset name of the held-out split (its digest: the dataset version)

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


# it reads the metadata of all three (held-out images, the autoencoder's run, the LDM): lineage says so
@dg.asset(
    group_name=GROUP,
    deps=["image_dataset", "vae_model", "ldm_model"],
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    retry_policy=GPU_RETRY_POLICY,
    kinds={"html", "mlflow"},
    description=__doc__,
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    config: EvaluationReportConfig,
    mlflow: MLflowResource,
    storage: StorageResource,
    compute: ComputeResource,
    run_config_check: RunConfigCheck,
) -> dg.MaterializeResult:
    reads = [read_upstream(context, key) for key in ("ldm_model", "image_dataset", "vae_model")]
    ldm_md, ds, vae_md = (r.metadata for r in reads)
    eval_cfg = to_core(EvaluationConfig, config.evaluation, "evaluation_report.evaluation")
    device = compute.torch_device()
    model = load_text_to_image(ldm_md["ldm_url"])
    # the backbone the report names: as ldm_model recorded it, or (a bundle from before it did) from the weights' config
    backbone = model.info.get("backbone") or backbone_summary(model.denoiser.config)
    resolution = model.latent_shape[1] * model.vae.config.downsample_factor
    held_out = held_out_from_dataset(
        ImageShardDataset(ds["dataset_url"], split="validation", resolution=resolution), config.held_out_images
    )
    photos = None
    if config.photo_images and ds.get("photos_url"):
        pds = ImageShardDataset(ds["photos_url"], split=None, resolution=resolution)
        photos = to_uint8(pds.get_batch(list(range(min(len(pds), config.photo_images))))) if len(pds) else None
    generate_fn, reconstruct_fn = text_to_image_functions(
        model, steps=config.steps, guidance=config.guidance, device=device
    )

    client = mlflow.client()
    # a registry error raises here and the step is retried: it never passes for "no champion"
    champion = read_champion_for_gate(client, REGISTERED_NAME)
    measure_champion = champion.version is not None and champion.metrics is None
    champion_label = f"{REGISTERED_NAME} {champion.label}" if champion.version is not None else None

    def measure_registered(version: str) -> dict:
        """A registered version measured exactly as the candidate (same held-out rows and seeds), its metrics recorded
        on it for the next gate."""
        with temp_dir() as tmp:
            other = download_text_to_image(f"models:/{REGISTERED_NAME}/{version}", tmp)
            other_generate, other_reconstruct = text_to_image_functions(
                other, steps=config.steps, guidance=config.guidance, device=device
            )
            measured = measure(
                generate_fn=other_generate,
                reconstruct_fn=other_reconstruct,
                held_out=held_out,
                config=eval_cfg,
                device=device,
                photos=photos,
            )
        metrics = {k: m.to_dict() for k, m in measured.metrics.items()}
        client.set_model_version_tag(REGISTERED_NAME, version, METRICS_TAG, json.dumps(metrics))
        return metrics

    runs = {
        k: v for k, v in (("vae_model", vae_md.get("mlflow_run_id")), ("ldm_model", ldm_md.get("mlflow_run_id"))) if v
    }
    out_url = storage.url("reports", f"ldm-v{ldm_md['ldm_version']}-{context.run.run_id[:8]}")
    model_id = ldm_md.get("mlflow_model_id")  # the logged model (MLflow 3); absent from older materializations

    with mlflow.materialization_run(context) as run:
        run.tracker.log_params(
            {
                "ldm_uri": ldm_md["ldm_uri"],
                "champion_before": champion_label or "none",
                "champion_measured_again": measure_champion,
                "backbone": describe_backbone(backbone),
                "guidance": config.guidance,
                "steps": config.steps,
                **eval_cfg.to_dict(),
            }
        )
        run.log_dataset(
            name=HELD_OUT_DATASET,
            url=ds["dataset_url"],
            digest=str(ds["dataset_version"]),
            context="evaluation",
            model_id=model_id,
        )
        if measure_champion:
            # its metrics tag is gone (deleted, or a version promoted by hand): measure it again exactly as the
            # candidate, on the same held-out rows and seeds, rather than judge the candidate on thresholds alone
            context.log.warning(f"champion {champion_label} has no {METRICS_TAG} tag: measuring it again")
            champion = Champion(champion.version, measure_registered(champion.version))
        result = evaluate(
            out_url,
            generate_fn=generate_fn,
            reconstruct_fn=reconstruct_fn,
            held_out=held_out,
            config=eval_cfg,
            champion_metrics=champion.metrics,
            champion_label=champion_label,
            loss_curves=_loss_curves(client, runs),
            run_config={
                "ldm_uri": ldm_md["ldm_uri"],
                "vae_uri": ldm_md["vae_uri"],
                "dataset": ds["dataset_url"],
                "dagster_run_id": context.run.run_id,
            },
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            device=device,
            photos=photos,
            model=backbone,
        )
        values = {k: m.value for k, m in result.metrics.items() if m.computed}
        run.tracker.log_metrics(values, step=0)
        if model_id:  # the same numbers on the logged model itself (MLflow 3), tied to the held-out data measured
            run.log_model_metrics(
                values, model_id=model_id, dataset_name=HELD_OUT_DATASET, dataset_digest=str(ds["dataset_version"])
            )
        # read through storage, so that the report reaches MLflow from S3 as from a local root
        with temp_dir() as tmp:
            for name, url in result.report.files.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(ldm_storage.read_bytes(url))
            run.tracker.log_artifact(tmp, "report")
        # recorded before the move: a gate that finds this candidate champion judges its own against these
        client.set_model_version_tag(
            REGISTERED_NAME, str(ldm_md["ldm_version"]), METRICS_TAG, json.dumps(result.report.metrics)
        )
        promotion = promote(
            client,
            REGISTERED_NAME,
            str(ldm_md["ldm_version"]),
            result.report.metrics,
            judged_against=champion,
            decision=result.decision,
            gate=eval_cfg.gate,
            lock=storage_lock(storage.resolved_root(), f"promotion-{REGISTERED_NAME}"),
            measure=measure_registered,
        )
        decision = promotion.decision
        run.tracker.set_tags(
            {
                "ldm_uri": ldm_md["ldm_uri"],
                "gate_passed": str(decision.passed).lower(),
                "promotion": promotion.describe(),
            }
        )
        if promotion.outcome == "promoted":
            context.log.info(f"gate passed ({promotion.describe()}): alias champion → {ldm_md['ldm_uri']}")
        else:
            context.log.warning(f"champion unchanged ({promotion.describe()}): " + "; ".join(decision.reasons))
        numeric = {k: dg.MetadataValue.float(float(v)) for k, v in values.items()}
        not_computed = {k: m.reason for k, m in result.metrics.items() if not m.computed}
        return dg.MaterializeResult(
            metadata={
                **numeric,
                "report_html": result.report.html_url,
                "metrics_json": result.report.metrics_url,
                "gate_passed": decision.passed,
                "gate_reasons": dg.MetadataValue.json(decision.reasons),
                "promotion": promotion.describe(),
                "gate_compared_with": dg.MetadataValue.json(promotion.compared_with),
                "champion_after": f"{REGISTERED_NAME} v{after}" if (after := promotion.champion_after) else "none",
                "not_computed": dg.MetadataValue.json(not_computed),
                "ldm_uri": ldm_md["ldm_uri"],
                "champion_before": champion_label or "none",
                "summary": dg.MetadataValue.md(result.report.markdown),
                "color_confusions": dg.MetadataValue.json(confusion_lines(result.color_confusion or {})),
                "backbone": describe_backbone(backbone),
                "mlflow_run": dg.MetadataValue.url(run.url),
                **lineage_metadata(*reads),
            },
        )
