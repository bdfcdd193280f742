"""The tracker interface through which ldm_core reports (params, metrics, images, artifacts).

The pipeline passes an MLflow-backed implementation; tests pass `NullTracker` or `RecordingTracker`.
ldm_core never imports a tracking library itself.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Tracker(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_image(self, image: np.ndarray, name: str, step: int | None = None) -> None:
        """image: uint8 array (H, W, 3)."""
        ...

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...


class NullTracker:
    """Discards everything."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_image(self, image: np.ndarray, name: str, step: int | None = None) -> None:
        pass

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass


class RecordingTracker:
    """Keeps everything in memory: for tests, and for summaries the orchestrator shows (per-epoch numbers)."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.images: list[tuple[str, int | None, np.ndarray]] = []
        self.artifacts: list[tuple[str, str | None]] = []
        self.tags: dict[str, Any] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.metrics[k].append((step, float(v)))

    def log_image(self, image: np.ndarray, name: str, step: int | None = None) -> None:
        self.images.append((name, step, np.asarray(image)))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(local_path), artifact_path))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tags.update(tags)

    def last(self, key: str) -> float:
        return self.metrics[key][-1][1]


class FanoutTracker:
    """Sends every call to several trackers (e.g. MLflow + an in-memory recorder for Dagster summaries)."""

    def __init__(self, *trackers: Tracker) -> None:
        self.trackers = trackers

    def log_params(self, params: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_image(self, image: np.ndarray, name: str, step: int | None = None) -> None:
        for t in self.trackers:
            t.log_image(image, name, step)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        for t in self.trackers:
            t.log_artifact(local_path, artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.set_tags(tags)
