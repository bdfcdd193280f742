"""What the asset modules share: the group, GPU tagging, stable keys."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import dagster as dg

from pipeline.resources import TERMINATION_GRACE_S

GROUP = "ldm"

# GPU work: at most as many at once as the `gpu` concurrency pool allows (deploy/dagster.yaml), and on the
# Kubernetes executor each step asks for a GPU. On a machine without one the same assets run on CPU.
GPU_POOL = "gpu"
# Preemption sends SIGTERM, then SIGKILL this long after: the training steps use it to checkpoint at the next step
# and exit (pipeline.distributed.launch), so it exceeds their own grace (TERMINATION_GRACE_S) by the time the step
# needs to report its retry. A spot node's own shutdown notice can be shorter: see deploy/README.md.
POD_TERMINATION_GRACE_S = TERMINATION_GRACE_S + 60
GPU_OP_TAGS = {
    "dagster-k8s/config": {
        # dagster-k8s deep-merges a step's config onto the run launcher's (deploy/helm/values.yaml: the run pod's CPU
        # node selector and memory limit): a GPU pod would then ask for a CPU node and a GPU node at once and stay
        # Pending. SHALLOW replaces each key given here (node_selector, tolerations, resources) instead.
        "merge_behavior": "SHALLOW",
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}},
        # GPU node pools are commonly tainted nvidia.com/gpu:NoSchedule so that only pods asking for one land there
        "pod_spec_config": {
            "termination_grace_period_seconds": POD_TERMINATION_GRACE_S,
            "node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    },
}


# A GPU step that fails (a preempted node, a lost device, a flaky storage or registry call) is retried by Dagster:
# training resumes from its checkpoint (keyed on data + config), encoding from its manifest, so a retry redoes little.
# The backoff gives a preempted node time to be replaced. Config errors are never retried (dg.Failure with
# allow_retries=False); a run whose worker died is retried as a whole by the instance's run_retries (deploy/).
GPU_RETRY_POLICY = dg.RetryPolicy(max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL)


GPU_ASSET = {"group_name": GROUP, "pool": GPU_POOL, "op_tags": GPU_OP_TAGS, "retry_policy": GPU_RETRY_POLICY}
"""What every GPU asset's ``@dg.asset`` takes: ``@dg.asset(**GPU_ASSET, deps=…, kinds=…)``."""


def stable_key(*parts: Any, n: int = 12) -> str:
    """A short hash of JSON-able parts: names checkpoint directories so a re-run of the same work resumes."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def json_md(value: Any) -> dg.MetadataValue:
    return dg.MetadataValue.json(json.loads(json.dumps(value, default=str)))
