"""Jobs, the weekly schedule and the new-data sensor."""

import hashlib

import dagster as dg

from ldm_core import storage as ldm_storage
from pipeline import run_configs
from pipeline.asset_common import GROUP
from pipeline.defs.mlflow_runs import MLFLOW_RUN_HOOKS

ldm_training_job = dg.define_asset_job(
    "ldm_training_job",
    selection=dg.AssetSelection.groups(GROUP),
    description="The whole pipeline: dataset → VAE → latent store → LDM → evaluation report.",
    hooks=MLFLOW_RUN_HOOKS,
)

RETRAIN_ASSETS = {"image_dataset", "latent_store", "ldm_model", "evaluation_report"}
ldm_retrain_job = dg.define_asset_job(
    "ldm_retrain_job",
    selection=dg.AssetSelection.assets(*RETRAIN_ASSETS),
    description="Retraining on new data with the frozen VAE: ingest new shards, encode only new latents, retrain "
    "the LDM, evaluate (and promote if the gate passes).",
    hooks=MLFLOW_RUN_HOOKS,
)


@dg.schedule(
    name="ldm_weekly_retrain",
    cron_schedule="0 3 * * 0",
    job=ldm_training_job,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Weekly full retrain (Sundays 03:00) with LDM_RUN_CONFIG, default pipeline/configs/demo.yaml; "
    "the LDM warm-starts from the champion when it is a valid start (ldm_model.init_from: auto, "
    "unless the config sets init_from).",
)
def ldm_weekly_retrain(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    stamp = context.scheduled_execution_time.strftime("%Y-%m-%d") if context.scheduled_execution_time else "manual"
    return dg.RunRequest(
        run_key=f"weekly-{stamp}",
        run_config=run_configs.with_warm_start(run_configs.load()),
        tags={"ldm.trigger": "schedule"},
    )


def source_fingerprint(url: str) -> tuple[str, int]:
    """A cheap fingerprint of what is at the source (names, sizes, mtimes/etags) and its file count."""
    fs, root = ldm_storage.get_fs(url)
    try:
        entries = fs.find(root, detail=True)
    except FileNotFoundError:
        return "missing", 0
    h = hashlib.sha256()
    for path in sorted(entries):
        info = entries[path]
        h.update(
            f"{path}|{info.get('size')}|{info.get('mtime') or info.get('LastModified') or info.get('ETag')}\n".encode()
        )
    return h.hexdigest()[:16], len(entries)


@dg.sensor(
    name="ldm_new_data_sensor",
    job=ldm_retrain_job,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Launches retraining (new shards, new latents, LDM warm-started from the champion when it is a valid "
    "start, evaluation) when the dataset source changes.",
)
def ldm_new_data_sensor(context: dg.SensorEvaluationContext):
    config = run_configs.load()
    source = run_configs.dataset_source(config)
    if not source or source.startswith("builtin://"):
        return dg.SkipReason(
            f"the configured source {source or 'builtin://shapes'} is generated, not watched; set "
            "LDM_RUN_CONFIG to a config whose image_dataset.source is a real location"
        )
    fingerprint, n_files = source_fingerprint(source)
    shown = ldm_storage.redact_url(source)  # sensor ticks are kept and shown in the UI
    if context.cursor is None:
        context.update_cursor(fingerprint)
        return dg.SkipReason(f"baseline recorded for {shown} ({n_files} files)")
    if fingerprint == context.cursor:
        return dg.SkipReason(f"no change at {shown} ({n_files} files)")
    context.update_cursor(fingerprint)
    run_config = run_configs.with_warm_start(run_configs.for_assets(config, RETRAIN_ASSETS))
    return dg.RunRequest(
        run_key=f"new-data-{fingerprint}",
        run_config=run_config,
        tags={"ldm.trigger": "new_data", "ldm.source_files": str(n_files)},
    )
