"""The MLflow-backed tracker that ldm_core reports through, the system metrics of a run, and the Dagster-side
progress summary.

Per-step numbers go to MLflow only; Dagster gets a summary line at most every ``interval`` seconds (logging
every step to Dagster floods its event log).
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ldm_core.config import flatten_dict
from ldm_core.storage import redact_url
from ldm_core.tracking import NullTracker

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
_SECRET_KEY = re.compile(r"(secret|password|token|credential|access_key|session)", re.I)


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """Drop anything that looks like a credential before it reaches a tracker or a UI: values under a secret-like
    key, and the ``user:password@`` part of any URL in a text value."""
    return {
        k: ("<redacted>" if _SECRET_KEY.search(k) else redact_url(v) if isinstance(v, str) else v)
        for k, v in params.items()
    }


class MLflowTracker:
    """ldm_core.tracking.Tracker over one MLflow run (through MlflowClient: no global active-run state)."""

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = redact(flatten_dict(dict(params)))
        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if v is not None and math.isfinite(float(v))
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_image(self, image: np.ndarray, name: str, step: int | None = None) -> None:
        # key + step: MLflow keeps one image series per key, which its UI browses with a step slider
        self.client.log_image(self.run_id, np.asarray(image), key=name, step=0 if step is None else int(step))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(local_path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in redact(dict(tags)).items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)


class SystemMetrics:
    """MLflow's system metrics monitor over one run: every ``interval_s`` a sample of the machine's CPU, memory, disk
    and network use, and of each GPU's where NVML finds one (none found is no error: there are no GPU metrics then),
    logged as ``system/<name>`` metrics with a step per sample.

    It logs into ``tracking_uri``, never into whatever MLflow's process-wide tracking URI is, and samples at
    ``interval_s`` whatever MLflow's MLFLOW_SYSTEM_METRICS_* environment variables say. `stop` logs a last sample
    covering the time since the previous one: MLflow's monitor drops the interval its stop cuts short, so a run
    shorter than one interval would show no system metrics at all.
    """

    def __init__(self, run_id: str, *, tracking_uri: str, interval_s: float):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        if not interval_s > 0:
            raise ValueError(f"system metrics sampling interval must be > 0 s, got {interval_s!r}")
        self.run_id = run_id
        self.monitor = SystemMetricsMonitor(
            run_id, sampling_interval=interval_s, samples_before_logging=1, tracking_uri=tracking_uri
        )
        # the environment overrides both in MLflow's constructor: the caller's interval, one logged point per sample
        self.monitor.sampling_interval, self.monitor.samples_before_logging = interval_s, 1

    def start(self) -> SystemMetrics:
        self.monitor.start()
        return self

    def stop(self) -> None:
        """Stop sampling (after the sampling thread's store call in progress, if any), and log the last interval."""
        self.monitor.finish()
        self.monitor.collect_metrics()
        self.monitor.publish_metrics(self.monitor.aggregate_metrics())
        self.monitor.mlflow_logger.flush()


class DagsterProgress(NullTracker):
    """A Tracker that turns step metrics into an occasional one-line summary in the Dagster run log (the rest it
    discards, as `NullTracker`)."""

    def __init__(self, dagster_log: Any, label: str, interval: float = 20.0, keys: tuple[str, ...] = ()):
        self.dlog, self.label, self.interval, self.keys = dagster_log, label, interval, keys
        self._last = 0.0
        self.latest: dict[str, float] = {}
        self.latest_step = 0

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.latest.update({k: float(v) for k, v in metrics.items()})
        self.latest_step = step
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            shown = {k: self.latest[k] for k in (self.keys or self.latest) if k in self.latest}
            self.dlog.info(f"{self.label} step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))


def temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="ldm-")
