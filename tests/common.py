"""Helpers that tests in more than one folder use: the repository root, a child Python's environment, the tiny run
config, Dagster metadata as values, free ports, waiting for a local server.

Helpers of one folder live there (tests/e2e/helpers.py, tests/core/tiny_models.py, ...).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
"""The repository's root."""
TINY = ROOT / "tests" / "e2e" / "tiny.yaml"
"""The smallest run config of the whole pipeline (seconds per asset on CPU)."""


def load_tiny_config() -> dict:
    """A fresh copy of tiny.yaml's run config (callers may change it)."""
    return yaml.safe_load(TINY.read_text())


def python_env() -> dict[str, str]:
    """This process's environment for a child Python that imports this checkout (PYTHONPATH: the repository)."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def metadata_values(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Dagster metadata (of a materialization or a check) as plain values: each MetadataValue's ``.value``."""
    return {k: getattr(v, "value", v) for k, v in metadata.items()}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of the call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str, timeout: float = 5.0) -> bool:
    """Whether an HTTP GET of ``url`` returns 200 (False while the server is not up yet)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def wait_for(
    what: str,
    ready: Callable[[], bool],
    timeout: float,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
) -> None:
    """Poll ``ready`` until it holds; fail naming ``what`` (with the tail of ``log``) when ``proc`` exits first or
    ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s\n{tail}")
