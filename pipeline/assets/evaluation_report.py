"""`evaluation_report`: metrics, a self-contained HTML report and the promotion gate; moves alias `champion`."""

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
from pipeline.assets.common import GPU_OP_TAGS, GPU_POOL, GPU_RETRY_POLICY, GROUP, upstream_metadata
from pipeline.assets.ldm_model import REGISTERED_NAME
from pipeline.config_bridge import to_core
from pipeline.mlflow_models import download_text_to_image
from pipeline.resources import ComputeResource, MLflowResource, StorageResource
from pipeline.tracking import temp_dir
from pipeline.validation import RunConfigCheck

METRICS_TAG = "evaluation_metrics"  # on a registered `ldm` version: its metrics.json "metrics", for the next gate
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
@dg.asset(group_name=GROUP, deps=["image_dataset", "vae_model", "ldm_model"], pool=GPU_POOL, op_tags=GPU_OP_TAGS,
          retry_policy=GPU_RETRY_POLICY, kinds={"html", "mlflow"}, description=__doc__)
def evaluation_report(context: dg.AssetExecutionContext, config: EvaluationReportConfig, mlflow: MLflowResource,
                      storage: StorageResource, compute: ComputeResource,
                      run_config_check: RunConfigCheck) -> dg.MaterializeResult:
    ldm_md = upstream_metadata(context, "ldm_model")
    ds = upstream_metadata(context, "image_dataset")
    vae_md = upstream_metadata(context, "vae_model")
    eval_cfg = to_core(EvaluationConfig, config.evaluation, "evaluation_report.evaluation")
    device = compute.torch_device()
    model = load_text_to_image(ldm_md["ldm_url"])
    # the backbone the report names: as ldm_model recorded it, or (a bundle from before it did) from the weights' config
    backbone = model.info.get("backbone") or backbone_summary(model.denoiser.config)
    resolution = model.latent_shape[1] * model.vae.config.downsample_factor
    held_out = held_out_from_dataset(ImageShardDataset(ds["dataset_url"], split="validation", resolution=resolution),
                                     config.held_out_images)
    photos = None
    if config.photo_images and ds.get("photos_url"):
        pds = ImageShardDataset(ds["photos_url"], split=None, resolution=resolution)
        photos = to_uint8(pds.get_batch(list(range(min(len(pds), config.photo_images))))) if len(pds) else None
    generate_fn, reconstruct_fn = text_to_image_functions(
        model, steps=config.steps, guidance=config.guidance, device=device
    )

    client = mlflow.client()
    # a registry error raises here and the step is retried: it never passes for "no champion"
    champion = mlflow.latest_alias_version(REGISTERED_NAME, "champion")
    measure_champion = champion is not None and METRICS_TAG not in champion.tags
    champion_metrics = json.loads(champion.tags[METRICS_TAG]) if champion is not None and not measure_champion else None
    champion_label = f"{REGISTERED_NAME} v{champion.version}" if champion is not None else None
    runs = {
        k: v for k, v in (("vae_model", vae_md.get("mlflow_run_id")), ("ldm_model", ldm_md.get("mlflow_run_id"))) if v
    }
    out_url = storage.url("reports", f"ldm-v{ldm_md['ldm_version']}-{context.run.run_id[:8]}")
    model_id = ldm_md.get("mlflow_model_id")  # the logged model (MLflow 3); absent from older materializations

    with mlflow.materialization_run(context) as run:
        run.tracker.log_params({"ldm_uri": ldm_md["ldm_uri"], "champion_before": champion_label or "none",
                                "champion_measured_again": measure_champion,
                                "backbone": describe_backbone(backbone),
                                "guidance": config.guidance, "steps": config.steps, **eval_cfg.to_dict()})
        run.log_dataset(name=HELD_OUT_DATASET, url=ds["dataset_url"], digest=str(ds["dataset_version"]),
                        context="evaluation", model_id=model_id)
        if measure_champion:
            # its metrics tag is gone (deleted, or a version promoted by hand): measure it again exactly as the
            # candidate, on the same held-out rows and seeds, rather than judge the candidate on thresholds alone
            context.log.warning(f"champion {champion_label} has no {METRICS_TAG} tag: measuring it again")
            with temp_dir() as tmp:
                champion_model = download_text_to_image(f"models:/{REGISTERED_NAME}/{champion.version}", tmp)
                champion_generate, champion_reconstruct = text_to_image_functions(
                    champion_model, steps=config.steps, guidance=config.guidance, device=device)
                measured = measure(generate_fn=champion_generate, reconstruct_fn=champion_reconstruct,
                                   held_out=held_out, config=eval_cfg, device=device, photos=photos)
            champion_metrics = {k: m.to_dict() for k, m in measured.metrics.items()}
            client.set_model_version_tag(REGISTERED_NAME, str(champion.version), METRICS_TAG,
                                         json.dumps(champion_metrics))
        result = evaluate(
            out_url, generate_fn=generate_fn, reconstruct_fn=reconstruct_fn, held_out=held_out, config=eval_cfg,
            champion_metrics=champion_metrics, champion_label=champion_label, loss_curves=_loss_curves(client, runs),
            run_config={"ldm_uri": ldm_md["ldm_uri"], "vae_uri": ldm_md["vae_uri"], "dataset": ds["dataset_url"],
                        "dagster_run_id": context.run.run_id},
            created_at=datetime.now(UTC).isoformat(timespec="seconds"), device=device, photos=photos,
            model=backbone,
        )
        values = {k: m.value for k, m in result.metrics.items() if m.computed}
        run.tracker.log_metrics(values, step=0)
        if model_id:  # the same numbers on the logged model itself (MLflow 3), tied to the held-out data measured
            run.log_model_metrics(values, model_id=model_id, dataset_name=HELD_OUT_DATASET,
                                  dataset_digest=str(ds["dataset_version"]))
        run.tracker.set_tags({"ldm_uri": ldm_md["ldm_uri"], "gate_passed": str(result.decision.passed).lower()})
        # read through storage, so that the report reaches MLflow from S3 as from a local root
        with temp_dir() as tmp:
            for name, url in result.report.files.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(ldm_storage.read_bytes(url))
            run.tracker.log_artifact(tmp, "report")
        client.set_model_version_tag(REGISTERED_NAME, str(ldm_md["ldm_version"]), METRICS_TAG,
                                     json.dumps(result.report.metrics))
        if result.decision.passed:
            client.set_registered_model_alias(REGISTERED_NAME, "champion", str(ldm_md["ldm_version"]))
            context.log.info(f"gate passed: alias champion → {ldm_md['ldm_uri']}")
        else:
            context.log.warning("gate did not pass, champion unchanged: " + "; ".join(result.decision.reasons))
        numeric = {k: dg.MetadataValue.float(float(v)) for k, v in values.items()}
        not_computed = {k: m.reason for k, m in result.metrics.items() if not m.computed}
        return dg.MaterializeResult(
            metadata={
                **numeric, "report_html": result.report.html_url, "metrics_json": result.report.metrics_url,
                "gate_passed": result.decision.passed, "gate_reasons": dg.MetadataValue.json(result.decision.reasons),
                "not_computed": dg.MetadataValue.json(not_computed), "ldm_uri": ldm_md["ldm_uri"],
                "champion_before": champion_label or "none", "summary": dg.MetadataValue.md(result.report.markdown),
                "color_confusions": dg.MetadataValue.json(confusion_lines(result.color_confusion or {})),
                "backbone": describe_backbone(backbone), "mlflow_run": dg.MetadataValue.url(run.url),
            },
        )
