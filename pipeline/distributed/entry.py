"""What every torchrun rank runs: read the job, join the process group, train; rank 0 reports back to Dagster.

Rank 0 alone opens Dagster Pipes (when launched by Dagster): its progress lines reach the asset's run log as they
happen, its MLflow tracker writes to the asset's MLflow run, and at the end it saves the model to the job's
``output_url`` and reports the train result (a custom message the asset rebuilds the result from) and metadata (a
materialization the asset merges into its own). Other ranks train silently. Run by hand (no Dagster), rank 0 logs
to the console instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from typing import Any, Iterator

from ldm_core import distributed
from ldm_core.tracking import FanoutTracker, NullTracker, Tracker
from pipeline.distributed.jobs import LdmTrainJob, VaeTrainJob, read_job, result_summary

RESULT_MESSAGE = "ldm.train_result"
"""The ``type`` of the custom Pipes message that carries the train result."""
PROGRESS_KEYS = {
    "vae": ("rec", "nll", "kl", "d_loss", "images_per_second"),
    "ldm": ("loss", "grad_norm", "lr", "samples_per_second"),
}

log = logging.getLogger("pipeline.distributed")


@contextlib.contextmanager
def _dagster_pipes(is_main: bool) -> Iterator[Any]:
    """Rank 0's Pipes context when Dagster launched us (None otherwise, and on every other rank)."""
    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

    if not is_main or DAGSTER_PIPES_CONTEXT_ENV_VAR not in os.environ:
        yield None
        return
    with open_dagster_pipes() as pipes:
        yield pipes


def _tracker(job: VaeTrainJob | LdmTrainJob, progress_log: Any) -> Tracker:
    """Rank 0's tracker: the asset's MLflow run, plus progress lines in the Dagster run log."""
    from pipeline.tracking import DagsterProgress

    trackers: list[Tracker] = [DagsterProgress(progress_log, job.stage, keys=PROGRESS_KEYS[job.stage])]
    if job.mlflow_run_id:
        from mlflow.tracking import MlflowClient

        from pipeline.tracking import MLflowTracker

        client = MlflowClient(tracking_uri=job.mlflow_tracking_uri, registry_uri=job.mlflow_tracking_uri)
        trackers.insert(0, MLflowTracker(client, job.mlflow_run_id))
    return FanoutTracker(*trackers)


def main(stage: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.distributed.train_{stage}",
                                     description=f"Train stage {stage!r} on this torchrun rank from a job file.")
    parser.add_argument("job", help="the job JSON written by the asset (pipeline.distributed.jobs)")
    args = parser.parse_args(argv)
    job = read_job(args.job)
    if job.stage != stage:
        parser.error(f"{args.job} is a {job.stage!r} job, not {stage!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    ctx = distributed.init_distributed()
    try:
        with _dagster_pipes(ctx.is_main) as pipes:
            console = pipes.log if pipes is not None else log
            if ctx.is_main:
                console.info(f"{stage}: rank 0 of {ctx.world_size} processes ({ctx.backend or 'no process group'}), "
                             f"checkpoints in {job.checkpoint_dir}")
            tracker = _tracker(job, console) if ctx.is_main else NullTracker()
            result = job.train(tracker)
            if ctx.is_main:
                job.save_model(result.model)
                console.info(f"{stage}: trained {result.step} steps on {ctx.world_size} processes; "
                             f"model saved to {job.output_url}")
                if pipes is not None:
                    pipes.report_custom_message({"type": RESULT_MESSAGE, "result": result_summary(result)})
                    pipes.report_asset_materialization(metadata={
                        "world_size": ctx.world_size, "distributed_backend": ctx.backend or "none",
                        "trained_steps": result.step,
                    })
    finally:
        distributed.teardown()
    return 0
