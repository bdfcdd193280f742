"""How the MLflow runs of a Dagster run end: hooks for what the run's own process sees, run-status sensors for the
rest.

Each materialization ends its own MLflow run (`MLflowResource.materialization_run`). The jobs' hooks end the parent:
FINISHED after the run's last step succeeds, FAILED when a step fails for good (Dagster fires no failure hook for an
attempt it retries). What no step can do is left to the sensors, once Dagster records the run's end: a run worker or
step pod that was killed (run monitoring, or the code server that launched it, marks the run failed), a run
canceled while no step could clean up, a run of the UI's ad-hoc asset job (which carries no hooks). They run in the
daemon (`dagster dev`, `ldm ui`, deploy/) and are on by default: they launch nothing.
"""

from __future__ import annotations

import dagster as dg

from pipeline.resources import MLflowResource

# ---------------------------------------------------------------------------------------------------------------
# Sensors: what no process of the run could do
# ---------------------------------------------------------------------------------------------------------------

INTERVAL_SECONDS = 30
# Runs started outside a code location (`dagster job execute`, `ldm demo`) belong to none, so a sensor watching only
# its own would never see them; a run of another code location has no MLflow runs tagged with its id, so nothing
# changes for it.
ALL_CODE_LOCATIONS = True


def _end(context: dg.RunStatusSensorContext, mlflow: MLflowResource, outcome: str) -> None:
    run_id = context.dagster_run.run_id
    changed = mlflow.end_dagster_run(run_id, outcome)
    if changed:
        context.log.info(
            f"Dagster run {run_id}: MLflow runs ended "
            + ", ".join(f"{mlflow_run} {status}" for mlflow_run, status in changed.items())
        )


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    name="mlflow_runs_end_on_success",
    minimum_interval_seconds=INTERVAL_SECONDS,
    monitor_all_code_locations=ALL_CODE_LOCATIONS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Marks the MLflow parent run of a succeeded Dagster run FINISHED (and any "
    "materialization run a killed attempt left open KILLED).",
)
def mlflow_runs_end_on_success(context: dg.RunStatusSensorContext, mlflow: MLflowResource) -> None:
    _end(context, mlflow, "FINISHED")


@dg.run_failure_sensor(
    name="mlflow_runs_end_on_failure",
    minimum_interval_seconds=INTERVAL_SECONDS,
    monitor_all_code_locations=ALL_CODE_LOCATIONS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Marks the MLflow runs of a failed Dagster run FAILED, or KILLED where a "
    "materialization never ended (its process died).",
)
def mlflow_runs_end_on_failure(context: dg.RunFailureSensorContext, mlflow: MLflowResource) -> None:
    _end(context, mlflow, "FAILED")


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.CANCELED,
    name="mlflow_runs_end_on_cancel",
    minimum_interval_seconds=INTERVAL_SECONDS,
    monitor_all_code_locations=ALL_CODE_LOCATIONS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Marks the MLflow runs of a canceled Dagster run KILLED.",
)
def mlflow_runs_end_on_cancel(context: dg.RunStatusSensorContext, mlflow: MLflowResource) -> None:
    _end(context, mlflow, "KILLED")


# ---------------------------------------------------------------------------------------------------------------
# Hooks: the run's own process
# ---------------------------------------------------------------------------------------------------------------

_FINISHED_STEP = {dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.STEP_SKIPPED}


def _steps_to_come(context: dg.HookContext) -> set[str]:
    """The steps of this run's plan (assets and checks) that have not finished, besides the hook's own."""
    instance = context.instance
    run = instance.get_run_by_id(context.run_id)
    plan = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
    finished = {entry.step_key for entry in instance.all_logs(context.run_id, of_type=_FINISHED_STEP)}
    return set(plan.step_keys_to_execute) - finished - {context.step_key}


@dg.success_hook(name="mlflow_parent_run_finished", required_resource_keys={"mlflow"})
def mlflow_parent_run_finished(context: dg.HookContext) -> None:
    if not _steps_to_come(context):
        context.resources.mlflow.end_parent_run(context.run_id, "FINISHED")


@dg.failure_hook(name="mlflow_parent_run_failed", required_resource_keys={"mlflow"})
def mlflow_parent_run_failed(context: dg.HookContext) -> None:
    context.resources.mlflow.end_parent_run(context.run_id, "FAILED")


MLFLOW_RUN_HOOKS = {mlflow_parent_run_finished, mlflow_parent_run_failed}
