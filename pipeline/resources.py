"""Resources: MLflow (tracking + registry), storage (an fsspec root URL), compute (device, precision, processes).

Defaults come from LDM_HOME (see `pipeline.settings`) and can be overridden by run config or environment, so the
same definitions run on a laptop (SQLite + local files) and in deploy/ (Postgres + S3) without code edits.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import dagster as dg
import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, LoggedModelInput, Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from pydantic import Field

from ldm_core import storage as ldm_storage
from ldm_core.trainers.preemption import TrainingInterrupted
from pipeline import settings
from pipeline.registry import version_by_alias
from pipeline.tracking import MLflowTracker, SystemMetrics

log = logging.getLogger(__name__)

# How long a stopping torchrun training gets from SIGTERM to exit: one step plus one checkpoint write of the largest
# preset must fit (each stop logs its latency: "stopped on SIGTERM at step N, S s after the signal").
TERMINATION_GRACE_S = 120
# How long a collective waits for a rank that stopped answering before every other rank fails (torch's own default,
# 30 minutes, would hold a whole GPU job idle that long behind one lost node); it must cover the longest silence of a
# healthy rank between two collectives: a checkpoint write, a validation grid, a slow first step.
COLLECTIVE_TIMEOUT_S = 600
STRATEGIES = ("auto", "ddp", "fsdp")
LAUNCHERS = ("local", "k8s")
PARENT_TAG = "ldm.parent"
SEARCH_MAX_RESULTS = 1000  # the MLflow runs of one Dagster run: one per materialization attempt, and the parent
DATASET_DIGEST_MAX_LEN = 36  # MLflow's SQL stores keep a dataset digest in a VARCHAR(36) (Postgres enforces it)


class MLflowResource(dg.ConfigurableResource):
    """MLflow tracking and model registry. Every materialization is a run nested under one parent run per Dagster
    run, tagged with the Dagster run id, asset key and partition."""

    tracking_uri: str | None = Field(
        default=None, description="Tracking/registry store; default MLFLOW_TRACKING_URI or sqlite under LDM_HOME."
    )
    artifact_location: str | None = Field(
        default=None,
        description="Artifact root for the experiment; default LDM_MLFLOW_ARTIFACTS or LDM_HOME/mlartifacts.",
    )
    experiment: str = Field(default="ldm-pipeline", description="MLflow experiment name.")
    ui_url: str | None = Field(default=None, description="Base URL of the MLflow UI, for links in Dagster metadata.")
    system_metrics_interval_s: float = Field(
        default=10.0,
        description="How often a run that records system metrics (the training runs) samples CPU, memory, disk, "
        "network and GPU use; each sample is a step of its system/... metrics. This, not MLflow's "
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, sets it.",
    )

    # -- plumbing ---------------------------------------------------------------------------------------------
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or settings.mlflow_tracking_uri()

    def client(self) -> Any:
        uri = self.resolved_tracking_uri()
        if uri.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(uri[len("sqlite:///") :]) or ".", exist_ok=True)
        # the fluent API (log_model, register_model) reads the global URI; keep it consistent with the client
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    def experiment_id(self, client: Any) -> str:
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(
                self.experiment, artifact_location=self.artifact_location or settings.mlflow_artifact_location()
            )
        except Exception:  # created concurrently by another step
            return client.get_experiment_by_name(self.experiment).experiment_id

    def run_url(self, experiment_id: str, run_id: str) -> str:
        return f"{(self.ui_url or settings.mlflow_ui_url()).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def _parent_run(self, client: Any, exp_id: str, dagster_run_id: str, job_name: str) -> str:
        found = client.search_runs(
            [exp_id],
            filter_string=f"tags.`dagster.run_id` = '{dagster_run_id}' and tags.`{PARENT_TAG}` = 'true'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        run = client.create_run(
            exp_id,
            run_name=f"{job_name}-{dagster_run_id[:8]}",
            tags={"dagster.run_id": dagster_run_id, "dagster.job": job_name, PARENT_TAG: "true"},
        )
        return run.info.run_id

    @contextlib.contextmanager
    def materialization_run(
        self, context: dg.AssetExecutionContext, *, system_metrics: bool = False
    ) -> Iterator[TrackedRun]:
        """An MLflow run for this materialization, under the Dagster run's parent run, ended with the step: FINISHED,
        FAILED, or KILLED when the step is interrupted (the Dagster run is being terminated).

        The parent is RUNNING while a materialization is; the jobs' hooks end it when the run's last step succeeds or
        a step fails for good, and the run-status sensors (`pipeline.defs.mlflow_runs`) end what a process could not.

        With ``system_metrics``, the run records the machine's use while it is open (`pipeline.tracking.SystemMetrics`,
        every ``system_metrics_interval_s`` and once more at its end): CPU and memory, disk, network, and each GPU's
        where NVML finds one. They cover the whole machine, so processes the step launches (torchrun) count too.
        """
        if system_metrics and not self.system_metrics_interval_s > 0:
            raise dg.Failure(
                f"mlflow.system_metrics_interval_s must be > 0, got {self.system_metrics_interval_s}",
                allow_retries=False,
            )
        client = self.client()
        exp_id = self.experiment_id(client)
        dagster_run_id = context.run.run_id
        asset_key = context.asset_key.to_user_string()
        partition = context.partition_key if context.has_partition_key else ""
        parent = self._parent_run(client, exp_id, dagster_run_id, context.job_name or "adhoc")
        client.update_run(parent, status="RUNNING")  # reopened by the retry of a run or step that ended it
        run = client.create_run(
            exp_id,
            run_name=f"{asset_key}-{dagster_run_id[:8]}",
            tags={
                "mlflow.parentRunId": parent,
                "dagster.run_id": dagster_run_id,
                "dagster.asset_key": asset_key,
                "dagster.partition": partition,
                "dagster.job": context.job_name or "",
            },
        )
        tracked = TrackedRun(self, client, exp_id, run.info.run_id)
        monitor = self._start_system_metrics(run.info.run_id) if system_metrics else None
        try:
            try:
                yield tracked
            finally:  # before the run ends: its last sample is logged while it is RUNNING, whatever the outcome
                if monitor is not None:
                    self._stop_system_metrics(monitor)
        except (dg.DagsterExecutionInterruptedError, KeyboardInterrupt):
            for run_id in (run.info.run_id, parent):
                client.set_terminated(run_id, "KILLED")
            raise
        except TrainingInterrupted:  # stopped by a signal after a checkpoint: this attempt was killed, and is retried
            client.set_terminated(run.info.run_id, "KILLED")
            raise
        except BaseException:
            client.set_terminated(run.info.run_id, "FAILED")
            raise
        client.set_terminated(run.info.run_id, "FINISHED")

    def _start_system_metrics(self, run_id: str) -> SystemMetrics | None:
        """Sampling for ``run_id``, in this resource's store; None (and a warning) where it cannot start: the
        measurements are for the record, never a reason for a training step to fail."""
        try:
            return SystemMetrics(
                run_id, tracking_uri=self.resolved_tracking_uri(), interval_s=self.system_metrics_interval_s
            ).start()
        except Exception as e:
            log.warning(f"MLflow run {run_id}: system metrics not recorded ({type(e).__name__}: {e})")
            return None

    @staticmethod
    def _stop_system_metrics(monitor: SystemMetrics) -> None:
        try:
            monitor.stop()
        except Exception as e:  # never hides the step's own outcome
            log.warning(f"MLflow run {monitor.run_id}: last system metrics not logged ({type(e).__name__}: {e})")

    def _dagster_runs(self, client: Any, dagster_run_id: str) -> list[Any]:
        """Every MLflow run of one Dagster run: its parent and one per materialization attempt."""
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            return []
        return client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`dagster.run_id` = '{dagster_run_id}'",
            max_results=SEARCH_MAX_RESULTS,
        )

    def end_parent_run(self, dagster_run_id: str, status: str) -> None:
        """End the parent run of a Dagster run with ``status`` (FINISHED, FAILED), unless it was KILLED: an
        interrupted step's failure is the interruption's."""
        client = self.client()
        for r in self._dagster_runs(client, dagster_run_id):
            if r.data.tags.get(PARENT_TAG) == "true" and r.info.status != "KILLED":
                client.set_terminated(r.info.run_id, status)

    def end_dagster_run(self, dagster_run_id: str, outcome: str) -> dict[str, str]:
        """End the MLflow runs of a Dagster run that is over (``outcome``: FINISHED, FAILED or KILLED), as far as its
        own process could not: a materialization still RUNNING never ended (its process died or was stopped) and
        becomes KILLED; the parent takes the outcome, KILLED when a materialization of a run that did not succeed
        had to be. Returns {MLflow run id: status} of the runs it changed."""
        client = self.client()
        runs = self._dagster_runs(client, dagster_run_id)
        changed = {
            r.info.run_id: "KILLED"
            for r in runs
            if r.data.tags.get(PARENT_TAG) != "true" and r.info.status == "RUNNING"
        }
        parent_status = "KILLED" if changed and outcome != "FINISHED" else outcome
        changed.update(
            {
                r.info.run_id: parent_status
                for r in runs
                if r.data.tags.get(PARENT_TAG) == "true" and r.info.status != parent_status
            }
        )
        for run_id, status in changed.items():
            client.set_terminated(run_id, status)
        return changed

    # -- registry ---------------------------------------------------------------------------------------------
    def latest_alias_version(self, name: str, alias: str) -> Any | None:
        """The version ``name@alias`` points at; None only when the model or alias does not exist. A registry error
        raises (a retryable step failure), never passes for "none"."""
        return version_by_alias(self.client(), name, alias)


class RegisteredModel(NamedTuple):
    version: str
    """The new version of the registered model."""
    model_id: str
    """Its MLflow 3 logged model (metrics of the model are logged against this id)."""


class TrackedRun:
    """One MLflow run: the tracker ldm_core writes to, plus logging a model and registering it."""

    def __init__(self, resource: MLflowResource, client: Any, experiment_id: str, run_id: str):
        self.resource, self.client, self.experiment_id, self.run_id = resource, client, experiment_id, run_id
        self.tracker = MLflowTracker(client, run_id)

    @property
    def url(self) -> str:
        return self.resource.run_url(self.experiment_id, self.run_id)

    def log_and_register_pyfunc(
        self,
        *,
        name: str,
        registered_name: str,
        python_model: Any,
        artifacts: dict[str, str],
        signature: Any,
        alias: str | None,
        code_paths: list[str],
        pip_requirements: list[str],
        tags: dict[str, str] | None = None,
        input_example: Any = None,
    ) -> RegisteredModel:
        """Log a pyfunc model in this run, register a new version, point ``alias`` at it.

        ``code_paths`` ship the code the model runs with it, and ``pip_requirements`` pin what that code imports, so
        that serving it needs neither this project installed nor a guess at versions."""
        # log_model logs into the run active in MLflow's fluent API. Leaving a `with start_run` block would end the
        # run FINISHED while the materialization goes on (and its system metrics monitor stops at a run that is not
        # RUNNING): end_run(RUNNING) leaves it RUNNING, for materialization_run to end
        mlflow.start_run(run_id=self.run_id, log_system_metrics=False)
        try:
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=python_model,
                artifacts=artifacts,
                signature=signature,
                code_paths=code_paths,
                pip_requirements=pip_requirements,
                input_example=input_example,
            )
        finally:
            mlflow.end_run(status="RUNNING")
        mv = mlflow.register_model(info.model_uri, registered_name, tags=tags or {})
        if alias:
            self.client.set_registered_model_alias(registered_name, alias, mv.version)
        # the logged model's id from the log call: a SQL registry store returns versions without it
        return RegisteredModel(str(mv.version), info.model_id)

    def log_dataset(
        self,
        *,
        name: str,
        url: str,
        digest: str,
        context: str,
        model_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        """Record a dataset this run used (an MLflow dataset input: ``name``, ``digest``, ``url`` as its source, and
        ``context`` as its ``mlflow.data.context`` tag, e.g. "training", "evaluation"), identified by the pipeline's
        own version of it as the digest (at most 36 characters); ``tags`` are further input tags. With
        ``model_id``, the logged model it was used with is an input of the run as well.

        Through this run's client: the run stays RUNNING (MLflow's fluent ``log_input`` would need the run started,
        and leaving it ends the run)."""
        if not digest or len(digest) > DATASET_DIGEST_MAX_LEN:
            raise ValueError(
                f"dataset {name!r}: digest {digest!r} must be 1 to {DATASET_DIGEST_MAX_LEN} characters "
                "(MLflow's SQL stores keep no more)"
            )
        with warnings.catch_warnings():
            # MLflow registers its local-file source for both "" and "file://", and warns that a path matches both
            warnings.filterwarnings(
                "ignore", message="The specified dataset source can be interpreted in multiple ways"
            )
            source = resolve_dataset_source(url)
        dataset = MetaDataset(source, name=name, digest=digest)
        input_tags = [InputTag(str(k), str(v)) for k, v in (tags or {}).items()]
        input_tags.append(InputTag(MLFLOW_DATASET_CONTEXT, context))
        self.client.log_inputs(
            self.run_id,
            datasets=[DatasetInput(dataset._to_mlflow_entity(), input_tags)],
            models=[LoggedModelInput(model_id)] if model_id else None,
        )

    def log_model_metrics(
        self,
        metrics: dict[str, float],
        *,
        model_id: str,
        dataset_name: str | None = None,
        dataset_digest: str | None = None,
    ) -> None:
        """Log metrics of this run that belong to a logged model (MLflow 3 shows them on the model), measured on
        the named dataset version."""
        ts = int(time.time() * 1000)
        items = [
            Metric(k, float(v), ts, 0, model_id=model_id, dataset_name=dataset_name, dataset_digest=dataset_digest)
            for k, v in metrics.items()
            if math.isfinite(float(v))
        ]
        self.client.log_batch(self.run_id, metrics=items)


class StorageResource(dg.ConfigurableResource):
    """The storage root: every artifact of the pipeline lives under it (local path or s3://bucket/prefix)."""

    root: str | None = Field(
        default=None,
        description="fsspec URL; default LDM_STORAGE_ROOT or LDM_HOME/storage. "
        "S3 endpoint/credentials come from the environment, never from here.",
    )

    def resolved_root(self) -> str:
        root = self.root or settings.storage_root()
        if ldm_storage.has_credentials(root):
            # every artifact URL is built on the root and travels in Dagster metadata and MLflow tags
            raise ValueError(
                f"resources.storage.root: {ldm_storage.redact_url(root)} with credentials in the URL; "
                "give them through the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
            )
        return root

    def url(self, *parts: str) -> str:
        """The URL of ``parts`` under the root; a part that would leave it (absolute, ``..``, a URL) is refused."""
        for part in parts:
            if ldm_storage.contained_path(part) is None:
                raise ValueError(f"storage path {part!r} does not stay under the storage root")
        return ldm_storage.join(self.resolved_root(), *parts)

    def storage_options(self) -> dict[str, Any] | None:
        return None  # the environment supplies endpoint and credentials (ldm_core.storage.s3_options_from_env)


class ComputeResource(dg.ConfigurableResource):
    """Where GPU-tagged work runs. On a machine without a GPU the same assets run on CPU."""

    device: str = Field(default="auto", description='"auto" (CUDA if present, else CPU) or a torch device string.')
    precision: str | None = Field(
        default=None, description='Overrides the trainers\' precision ("fp32", "bf16", "auto") when set.'
    )
    # typed Any: Dagster config has no int-or-string union, and this takes 2 as well as "auto" (checked below)
    num_processes: Any = Field(
        default=1,
        description="Processes per training run: 1 trains in the asset's process; "
        "N > 1 launches torchrun through Dagster Pipes (NCCL, one per GPU; gloo on CPU); "
        '"auto" = one per visible GPU (1 without GPUs).',
    )
    threads: int | None = Field(default=None, description="torch CPU threads; default: torch's own choice.")
    termination_grace_s: int = Field(
        default=TERMINATION_GRACE_S,
        description="After SIGTERM/SIGINT, how long torchrun's processes get to "
        "checkpoint at the next step and exit before they are killed. It must cover one step plus one checkpoint "
        "write, and stay below the pod's terminationGracePeriodSeconds (pipeline/asset_common.py).",
    )
    strategy: str = Field(
        default="auto",
        description='How the processes share the training: "ddp" (every rank holds the whole model, gradients are '
        'averaged), "fsdp" (FSDP2: parameters, gradients and optimizer state sharded over the ranks, sharded DCP '
        'checkpoints), or "auto": ddp, except fsdp for denoisers of 1B+ parameters (the sd3-medium preset); the '
        "trainer resolves it. Applied to the trainer config of vae_model and ldm_model.",
    )
    nodes: int = Field(
        default=1,
        description="Machines the training spans. With nodes > 1, num_processes is per node and torchrun's agents "
        "meet in a c10d rendezvous (one agent per node: local processes on loopback, or one pod per node with "
        "launcher k8s).",
    )
    collective_timeout_s: float = Field(
        default=COLLECTIVE_TIMEOUT_S,
        description="How long a collective (gradient all-reduce, a stop vote, a barrier) waits for a rank that "
        "stopped answering before every other rank fails with an error instead of hanging. It must exceed the "
        "longest time a healthy rank spends between two collectives (a checkpoint write, a validation grid).",
    )
    launcher: str = Field(
        default="local",
        description='Where more than one process runs: "local" (torchrun agents in the step\'s machine; with '
        'nodes > 1, one agent per node on loopback) or "k8s" (an indexed Job of `nodes` pods with '
        "num_processes GPUs each, and a headless Service for the rendezvous: pipeline/distributed/k8s.py).",
    )
    k8s_image: str | None = Field(
        default=None, description="launcher k8s: the image the training pods run (this project's, deploy/Dockerfile)."
    )
    k8s_namespace: str | None = Field(
        default=None,
        description="launcher k8s: the namespace of the training Job; default the step pod's own namespace.",
    )
    k8s_service_account: str | None = Field(
        default=None, description="launcher k8s: the training pods' service account; default the namespace's."
    )
    k8s_env_secrets: list[str] = Field(
        default_factory=list,
        description="launcher k8s: Secrets whose keys become the training pods' environment (e.g. the S3 "
        "credentials, ldm-s3 in deploy/helm/values.yaml).",
    )

    def apply(self, trainer_cfg: Any) -> Any:
        """A copy of a trainer config with this resource's device, precision and strategy applied."""
        update: dict[str, Any] = {}
        # "auto" leaves a strategy the run config's trainer section chose; any other value decides
        if self.checked_strategy() != "auto" or getattr(trainer_cfg, "strategy", "auto") == "auto":
            update["strategy"] = self.strategy
        if self.device != "auto" or getattr(trainer_cfg, "device", "auto") == "auto":
            update["device"] = self.device
        if self.precision:
            update["precision"] = self.precision
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        return trainer_cfg.model_copy(update=update)

    def process_count(self) -> int:
        """How many training processes this resource asks for on each node ("auto": one per visible GPU, 1
        without). With launcher k8s the processes run in pods of their own: the count is theirs, not this machine's."""
        n = self.num_processes
        if n == "auto" and self.launcher == "k8s":
            raise dg.Failure(
                "compute.num_processes must be a number with launcher k8s (the GPUs each pod asks for)",
                allow_retries=False,
            )
        if n == "auto":
            import torch

            return max(1, torch.cuda.device_count()) if self.torch_device().startswith("cuda") else 1
        if isinstance(n, bool) or not isinstance(n, int) and not (isinstance(n, str) and n.isdigit()):
            raise dg.Failure(
                f'compute.num_processes must be a positive integer or "auto", got {n!r}', allow_retries=False
            )
        n = int(n)
        if n < 1:
            raise dg.Failure(f"compute.num_processes must be >= 1, got {n}", allow_retries=False)
        if self.launcher != "k8s" and self.torch_device().startswith("cuda"):
            import torch

            if n > torch.cuda.device_count():
                raise dg.Failure(
                    f"compute.num_processes={n} but only {torch.cuda.device_count()} GPUs are visible: "
                    "one process per GPU",
                    allow_retries=False,
                )
        return n

    def checked_strategy(self) -> str:
        if self.strategy not in STRATEGIES:
            raise dg.Failure(
                f"compute.strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}", allow_retries=False
            )
        return self.strategy

    def node_count(self) -> int:
        """How many nodes the training spans (>= 1), checked with the settings multi-node training needs."""
        if isinstance(self.nodes, bool) or not isinstance(self.nodes, int) or self.nodes < 1:
            raise dg.Failure(f"compute.nodes must be an integer >= 1, got {self.nodes!r}", allow_retries=False)
        if not self.collective_timeout_s > 0:
            raise dg.Failure(
                f"compute.collective_timeout_s must be > 0, got {self.collective_timeout_s}", allow_retries=False
            )
        if self.launcher not in LAUNCHERS:
            raise dg.Failure(
                f"compute.launcher must be one of {list(LAUNCHERS)}, got {self.launcher!r}", allow_retries=False
            )
        if self.launcher == "k8s" and not self.k8s_image:
            raise dg.Failure(
                "compute.launcher k8s needs compute.k8s_image (the training pods' image)", allow_retries=False
            )
        return self.nodes

    def torch_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device
