"""What every torchrun rank runs: read the spec, join the process group, train; rank 0 reports back to Dagster.

Rank 0 alone opens Dagster Pipes (when launched by Dagster): its progress lines reach the asset's run log as they
happen, its MLflow tracker writes to the asset's MLflow run, and at the end it saves the model to the spec's
``output_url`` and reports the train result (a custom message the asset rebuilds the result from) and metadata (a
materialization the asset merges into its own). Other ranks train silently. Run by hand (no Dagster), rank 0 logs
to the console instead.

A rank dies with its torchrun agent (`pipeline.distributed.lifetime`). SIGTERM (which the agent forwards to every
rank) stops all ranks at the same step with a checkpoint; rank 0 then reports it (``INTERRUPTED_MESSAGE``) and every
rank exits with ``EXIT_INTERRUPTED``, so the asset raises a retryable error and the retry resumes there.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes
from mlflow.tracking import MlflowClient

from ldm_core import distributed
from ldm_core.tracking import FanoutTracker, NullTracker, Tracker
from ldm_core.trainers.preemption import TrainingInterrupted
from pipeline.distributed import lifetime
from pipeline.distributed.specs import LdmTrainSpec, VaeTrainSpec, read_spec, result_summary
from pipeline.tracking import DagsterProgress, MLflowTracker

RESULT_MESSAGE = "ldm.train_result"
"""The ``type`` of the custom Pipes message that carries the train result."""
INTERRUPTED_MESSAGE = "ldm.train_interrupted"
"""The ``type`` of the custom Pipes message saying that training stopped on a signal after a checkpoint."""
EXIT_INTERRUPTED = 75
"""A rank's exit status after such a stop (EX_TEMPFAIL: run it again)."""
PROGRESS_KEYS = {
    "vae": ("rec", "nll", "kl", "d_loss", "images_per_second"),
    "ldm": ("loss", "grad_norm", "lr", "samples_per_second"),
}

log = logging.getLogger("pipeline.distributed")


@contextlib.contextmanager
def _dagster_pipes(is_main: bool) -> Iterator[Any]:
    """Rank 0's Pipes context when Dagster launched us (None otherwise, and on every other rank)."""
    if not is_main or DAGSTER_PIPES_CONTEXT_ENV_VAR not in os.environ:
        yield None
        return
    with open_dagster_pipes() as pipes:
        yield pipes


def _tracker(spec: VaeTrainSpec | LdmTrainSpec, progress_log: Any) -> Tracker:
    """Rank 0's tracker: the asset's MLflow run, plus progress lines in the Dagster run log."""
    trackers: list[Tracker] = [DagsterProgress(progress_log, spec.stage, keys=PROGRESS_KEYS[spec.stage])]
    if spec.mlflow_run_id:
        client = MlflowClient(tracking_uri=spec.mlflow_tracking_uri, registry_uri=spec.mlflow_tracking_uri)
        trackers.insert(0, MLflowTracker(client, spec.mlflow_run_id))
    return FanoutTracker(*trackers)


def main(stage: str, argv: list[str] | None = None) -> int:
    lifetime.rank_dies_with_agent()  # first: an orphaned rank must not get as far as training
    parser = argparse.ArgumentParser(
        prog=f"python -m pipeline.distributed.train_{stage}",
        description=f"Train stage {stage!r} on this torchrun rank from a spec file.",
    )
    parser.add_argument("spec", help="the spec JSON written by the asset (pipeline.distributed.specs)")
    args = parser.parse_args(argv)
    spec = read_spec(args.spec)
    if spec.stage != stage:
        parser.error(f"{args.spec} is a {spec.stage!r} spec, not {stage!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    # a rank that dies or hangs fails every other rank's next collective within this timeout instead of hanging it
    timeout_s = spec.collective_timeout_s or distributed.DEFAULT_TIMEOUT_S
    ctx = distributed.init_distributed(timeout_s=timeout_s)
    try:
        with _dagster_pipes(ctx.is_main) as pipes:
            console = pipes.log if pipes is not None else log
            if ctx.is_main:
                console.info(
                    f"{stage}: rank 0 of {ctx.world_size} processes ({ctx.backend or 'no process group'}), "
                    f"checkpoints in {spec.checkpoint_dir}, collective timeout {timeout_s:g}s"
                )
            tracker = _tracker(spec, console) if ctx.is_main else NullTracker()
            try:
                result = spec.train(tracker)
            except TrainingInterrupted as e:
                if ctx.is_main:
                    console.warning(str(e))
                    if pipes is not None:
                        pipes.report_custom_message(
                            {"type": INTERRUPTED_MESSAGE, "step": e.step, "signal": e.signame, "seconds": e.seconds}
                        )
                return EXIT_INTERRUPTED
            if ctx.is_main:
                spec.save_model(result.model)
                console.info(
                    f"{stage}: trained {result.step} steps on {ctx.world_size} processes; "
                    f"model saved to {spec.output_url}"
                )
                if pipes is not None:
                    pipes.report_custom_message({"type": RESULT_MESSAGE, "result": result_summary(result)})
                    pipes.report_asset_materialization(
                        metadata={
                            "world_size": ctx.world_size,
                            "distributed_backend": ctx.backend or "none",
                            "trained_steps": result.step,
                        }
                    )
    finally:
        distributed.teardown()
    return 0
