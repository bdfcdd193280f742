"""Training across M Kubernetes nodes: an indexed Job of M pods, one torchrun agent each, and a headless Service.

Why an indexed Job and a headless Service, and not the Kubeflow Trainer's job resource (TrainJob, formerly
PyTorchJob): these two are core Kubernetes objects (batch/v1 Indexed Jobs are GA since 1.24), so the training needs
nothing installed in the cluster beyond the GPU device plugin: no operator, no CRD, no controller to keep upgraded.
The Trainer would add elastic restarts and gang scheduling; a Dagster step retry (from the last checkpoint) already
restarts a failed training, and gang scheduling, where wanted, is a scheduler's job (Kueue admits a plain Job whole).

The objects, built by `manifests` from one `TrainingJob`:

- a ConfigMap with the spec (`pipeline.distributed.specs`), mounted read-only in every pod at `SPEC_PATH`; the URLs
  in it (data, checkpoints, output) must be on storage every pod reaches: the storage root on s3://;
- a headless Service (``clusterIP: None``) selecting the Job's pods on the port of the rendezvous, and the pods'
  ``subdomain`` set to its name: each pod of an indexed Job has the hostname ``<job>-<index>``, and with the
  subdomain it resolves as ``<job>-<index>.<service>`` inside the namespace;
- the Job: ``completionMode: Indexed``, ``completions = parallelism = M``, ``backoffLimit: 0`` (a failed pod fails
  the Job and Kubernetes terminates the other pods; the Dagster step's retry is the restart, from the last
  checkpoint). Each pod runs ``torchrun --nnodes=M --nproc-per-node=N --rdzv-backend=c10d
  --rdzv-endpoint=<job>-0.<service>:PORT --local-addr=<job>-<index>.<service>`` with ``nvidia.com/gpu: N``; pod 0
  hosts the rendezvous store (its address is the endpoint's), and as the agents' ranks follow their addresses,
  pod 0 holds global rank 0, the one that writes Dagster Pipes messages. ``JOB_COMPLETION_INDEX`` (the pod's index)
  is in every pod's environment, from the annotation the Job controller sets; c10d does not need it as a node rank.

`run_training_job` applies them with the ``kubernetes`` client, reads rank 0's Pipes messages from pod 0's log
(dagster-k8s' `PipesK8sPodLogsMessageReader`), waits for the Job, and deletes the three objects. It needs the `k8s`
extra (dagster-k8s, which brings the kubernetes client), imported when it runs: a laptop install has neither. It is
not run by the tests (there is no cluster here); the manifests are validated against the Kubernetes API schema
(tests/pipeline/test_k8s_training_job.py) and the command line they carry is the one the loopback stand-in runs
(tests/e2e/test_multinode_loopback.py).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from ldm_core.trainers.preemption import StopRequest, stop_on_signals
from pipeline.asset_common import GPU_OP_TAGS
from pipeline.distributed.specs import LdmTrainSpec, VaeTrainSpec
from pipeline.distributed.torchrun import Rendezvous, torchrun_command
from pipeline.resources import ComputeResource

SPEC_DIR = "/etc/ldm"
SPEC_PATH = f"{SPEC_DIR}/spec.json"
RENDEZVOUS_PORT = 29400
JOB_LABEL = "ldm.io/training-job"
"""The label that ties the Service to the Job's pods (the Job controller's own labels vary across versions)."""
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
CONTAINER = "trainer"
# The step pod's settings the training pods need as well; credentials travel only as Secrets (`env_secrets`)
FORWARDED_ENV = (
    "LDM_STORAGE_ROOT",
    "MLFLOW_TRACKING_URI",
    "LDM_MLFLOW_ARTIFACTS",
    "LDM_MLFLOW_UI_URL",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "HF_HUB_OFFLINE",
)
# the GPU nodes' selector and taint toleration, as the GPU step pods have them (pipeline/asset_common.py)
_GPU_POD = GPU_OP_TAGS["dagster-k8s/config"]["pod_spec_config"]
GPU_NODE_SELECTOR: dict[str, str] = _GPU_POD["node_selector"]
GPU_TOLERATIONS: list[dict[str, str]] = _GPU_POD["tolerations"]
NAME_MAX = 52  # pod hostnames <job>-<index> and the Job's own controller-uid label keep within 63 characters


@dataclass(frozen=True)
class TrainingJob:
    """One M-node training, everything its manifests say."""

    name: str
    """The Job's, the Service's and (with a suffix) the ConfigMap's name: a DNS-1123 label."""
    namespace: str
    image: str
    stage: str
    nodes: int
    processes: int
    """Ranks (GPUs) per node."""
    spec_json: str
    grace_s: int
    """From SIGTERM, how long the ranks get to checkpoint before torchrun kills them (the pod gets more)."""
    env: dict[str, str] = field(default_factory=dict)
    """Plain environment of every pod: the Pipes bootstrap, the forwarded settings."""
    env_secrets: tuple[str, ...] = ()
    service_account: str | None = None
    port: int = RENDEZVOUS_PORT

    @property
    def service(self) -> str:
        return self.name

    @property
    def config_map(self) -> str:
        return f"{self.name}-spec"

    def pod_address(self, index: int | str) -> str:
        """Pod ``index``'s DNS name in the namespace (hostname.subdomain)."""
        return f"{self.name}-{index}.{self.service}"

    def command(self) -> list[str]:
        # $(VAR) is expanded by Kubernetes from the container's environment, per pod
        rendezvous = Rendezvous(
            self.nodes, f"{self.pod_address(0)}:{self.port}", self.name, local_addr="$(LDM_NODE_ADDR)"
        )
        return torchrun_command(self.stage, self.processes, SPEC_PATH, self.grace_s, rendezvous, python="python")


def job_name(run_id: str, stage: str, attempt_key: str = "") -> str:
    """A name unique to the Dagster run, stage and attempt, valid as a DNS label and short enough for pod names."""
    digest = hashlib.sha256(f"{run_id}/{stage}/{attempt_key}".encode()).hexdigest()[:10]
    return f"ldm-{stage}-{run_id[:8]}-{digest}"[:NAME_MAX].lower()


def manifests(job: TrainingJob) -> list[dict[str, Any]]:
    """[ConfigMap, Service, Job], in the order they are created."""
    labels = {JOB_LABEL: job.name, "app.kubernetes.io/part-of": "ldm-pipeline"}
    meta = {"name": job.name, "namespace": job.namespace, "labels": labels}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**meta, "name": job.config_map},
        "data": {Path(SPEC_PATH).name: job.spec_json},
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_LABEL: job.name},
            # the rendezvous runs before any readiness: pod 0's name must resolve as soon as it has an address
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": job.port, "targetPort": job.port, "protocol": "TCP"}],
        },
    }
    return [config_map, service, _job(job, meta, labels)]


def _job(job: TrainingJob, meta: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
        },
        # after JOB_COMPLETION_INDEX: Kubernetes expands a reference to a variable defined earlier in the list
        {"name": "LDM_NODE_ADDR", "value": job.pod_address("$(JOB_COMPLETION_INDEX)")},
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # rank 0's Pipes messages reach the log as they are written
        *({"name": k, "value": v} for k, v in sorted(job.env.items())),
    ]
    gpus = str(job.processes)
    container = {
        "name": CONTAINER,
        "image": job.image,
        "command": job.command(),
        "env": env,
        "envFrom": [{"secretRef": {"name": s}} for s in job.env_secrets],
        "ports": [{"name": "rendezvous", "containerPort": job.port, "protocol": "TCP"}],
        "resources": {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}},
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},  # NCCL and DataLoader workers share memory through it
        ],
    }
    pod_spec: dict[str, Any] = {
        "subdomain": job.service,
        "restartPolicy": "Never",
        # SIGTERM to SIGKILL: the ranks' own grace, and the time to report the stop
        "terminationGracePeriodSeconds": job.grace_s + 60,
        "nodeSelector": dict(GPU_NODE_SELECTOR),
        "tolerations": [dict(t) for t in GPU_TOLERATIONS],
        "containers": [container],
        "volumes": [
            {"name": "spec", "configMap": {"name": job.config_map}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if job.service_account:
        pod_spec["serviceAccountName"] = job.service_account
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "completionMode": "Indexed",
            "completions": job.nodes,
            "parallelism": job.nodes,
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 3600,  # a backstop: the launcher deletes it when the step ends
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# The launcher (needs the `k8s` extra and a cluster)
# ---------------------------------------------------------------------------------------------------------------

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
POLL_S = 2.0
# The calls below, as the step pod's RBAC must allow them ((API group, resource): verbs); deploy/helm/training-rbac.yaml
# grants them to the step pods' service account
PERMISSIONS: dict[tuple[str, str], set[str]] = {
    ("batch", "jobs"): {"create", "get", "delete"},  # create_namespaced_job, read_namespaced_job, delete_…
    ("", "services"): {"create", "delete"},
    ("", "configmaps"): {"create", "delete"},
    ("", "pods"): {"list"},  # finding pod 0
    ("", "pods/log"): {"get"},  # following its log (PipesK8sPodLogsMessageReader)
}


def _own_namespace() -> str:
    try:
        return Path(SERVICE_ACCOUNT_NAMESPACE).read_text().strip()
    except OSError:
        return "default"


def training_job(
    context: dg.AssetExecutionContext,
    compute: ComputeResource,
    spec: VaeTrainSpec | LdmTrainSpec,
    processes: int,
    nodes: int,
    pipes_env: dict[str, str],
) -> TrainingJob:
    """The `TrainingJob` of this step's training."""
    return TrainingJob(
        name=job_name(context.run.run_id, spec.stage, str(context.retry_number)),
        namespace=compute.k8s_namespace or _own_namespace(),
        image=str(compute.k8s_image),
        stage=spec.stage,
        nodes=nodes,
        processes=processes,
        spec_json=spec.model_dump_json(),
        grace_s=compute.termination_grace_s,
        env={**{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}, **pipes_env},
        env_secrets=tuple(compute.k8s_env_secrets),
        service_account=compute.k8s_service_account,
    )


def run_training_job(
    context: dg.AssetExecutionContext,
    compute: ComputeResource,
    spec: VaeTrainSpec | LdmTrainSpec,
    processes: int,
    nodes: int,
) -> tuple[dg.PipesClientCompletedInvocation, int, StopRequest]:
    """Run the training as an indexed Job in one Pipes session: (the invocation, 0 if every pod succeeded else 1,
    the stop request). A SIGTERM or SIGINT here deletes the Job with the grace: its pods get SIGTERM and
    checkpoint, and rank 0 reports the stop."""
    import kubernetes
    from dagster_k8s.pipes import PipesK8sPodLogsMessageReader

    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    core, batch = kubernetes.client.CoreV1Api(), kubernetes.client.BatchV1Api()
    reader = PipesK8sPodLogsMessageReader()
    with dg.open_pipes_session(
        context=context, context_injector=dg.PipesEnvContextInjector(), message_reader=reader
    ) as session:
        job = training_job(context, compute, spec, processes, nodes, session.get_bootstrap_env_vars())
        objects = manifests(job)
        context.log.info(f"training {spec.stage} on {nodes} pods × {processes} GPUs: Job {job.namespace}/{job.name}")
        with stop_on_signals() as stop:
            try:
                config_map, service, job_manifest = objects
                core.create_namespaced_config_map(job.namespace, config_map)
                core.create_namespaced_service(job.namespace, service)
                batch.create_namespaced_job(job.namespace, job_manifest)
                returncode = _follow(context, core, batch, reader, job, stop)
            finally:
                _delete(core, batch, job, stop)
    return dg.PipesClientCompletedInvocation(session), returncode, stop


def _follow(context: Any, core: Any, batch: Any, reader: Any, job: TrainingJob, stop: StopRequest) -> int:
    """Read pod 0's log (rank 0's Pipes messages) in a thread while waiting for the Job's end or a stop signal."""
    logs: threading.Thread | None = None
    deleted = False
    while True:
        if logs is None and (pod := _running_pod_zero(core, job)) is not None:
            logs = threading.Thread(
                target=reader.consume_pod_logs, args=(context, core, pod, job.namespace), daemon=True
            )
            logs.start()
        if stop.requested and not deleted:
            context.log.warning(f"{stop.name}: deleting Job {job.name}; its pods checkpoint and stop")
            _delete_job(batch, job, grace_s=job.grace_s + 60)
            deleted = True
        status = batch.read_namespaced_job(job.name, job.namespace).status if not deleted else None
        done = status is not None and ((status.succeeded or 0) >= job.nodes or (status.failed or 0) > 0)
        if done or (deleted and stop.seconds_since() > job.grace_s + 60):
            if logs is not None:
                logs.join(timeout=60)  # the rest of pod 0's log: the result message is among its last lines
            return 0 if status is not None and (status.succeeded or 0) >= job.nodes else 1
        time.sleep(POLL_S)


def _running_pod_zero(core: Any, job: TrainingJob) -> str | None:
    """Pod 0's name once its container has started (its log can be followed), else None."""
    pods = core.list_namespaced_pod(job.namespace, label_selector=f"{JOB_LABEL}={job.name}").items
    for pod in pods:
        if (pod.metadata.annotations or {}).get(COMPLETION_INDEX_ANNOTATION) == "0" and pod.status.phase in (
            "Running",
            "Succeeded",
            "Failed",
        ):
            return pod.metadata.name
    return None


def _delete_job(batch: Any, job: TrainingJob, grace_s: int | None = None) -> None:
    batch.delete_namespaced_job(job.name, job.namespace, propagation_policy="Foreground", grace_period_seconds=grace_s)


def _delete(core: Any, batch: Any, job: TrainingJob, stop: StopRequest) -> None:
    """Delete the Job (with its pods), the Service and the ConfigMap; what is already gone is fine."""
    import kubernetes

    for delete in (
        lambda: _delete_job(batch, job, grace_s=job.grace_s + 60 if stop.requested else None),
        lambda: core.delete_namespaced_service(job.service, job.namespace),
        lambda: core.delete_namespaced_config_map(job.config_map, job.namespace),
    ):
        try:
            delete()
        except kubernetes.client.ApiException as e:
            if e.status != 404:
                raise
