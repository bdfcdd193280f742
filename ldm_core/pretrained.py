"""Pretrained weights that ldm_core needs, resolved in one place.

Each component is one file with one known home: either the torch hub checkpoint cache (``$TORCH_HOME/hub/checkpoints``,
the same place ``torchvision`` and ``torch.hub.load_state_dict_from_url`` use, so a file fetched once by any of them
is found here), or inside an installed package that ships it. When a file is missing and cannot be downloaded (this
pipeline often runs offline), :class:`MissingPretrainedWeights` says exactly which file to put in which directory and
where it comes from; nothing is ever substituted silently.

To add a component, add one entry to :data:`PRETRAINED`.
"""

from __future__ import annotations

import importlib.util
import logging
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

# Seconds to wait for a TCP connection to the download host before declaring the network unreachable: offline
# machines must fail in seconds, not hang on a download that can never start.
CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class PretrainedFile:
    """One weights file: its name, where it comes from, and what uses it."""

    filename: str
    """The file's name; for hub files, the name torchvision/torch.hub give it, so any of them finds the same file."""
    url: str
    """Where the file comes from (also named in the error when it is missing)."""
    used_for: str
    """What in the pipeline needs it, for messages and ``ldm weights``."""
    package: str | None = None
    """When set, the file ships inside this installed Python package (at ``package_path``) instead of the hub cache."""
    package_path: str | None = None
    hash_prefix: str | None = None
    """Leading hex digits of the file's sha256, checked on download (torchvision's file names carry them)."""


PRETRAINED: dict[str, PretrainedFile] = {
    "vgg16": PretrainedFile(
        filename="vgg16-397923af.pth",
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        used_for="LPIPS perceptual loss backbone (torchvision VGG16, ImageNet)",
        hash_prefix="397923af",
    ),
    "lpips_vgg_linear": PretrainedFile(
        filename="vgg.pth",
        url="https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
        used_for="LPIPS learned linear layers on the VGG features (v0.1)",
        package="lpips",
        package_path="weights/v0.1/vgg.pth",
    ),
    "inception_fid": PretrainedFile(
        filename="weights-inception-2015-12-05-6726825d.pth",
        url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        used_for="FID / rFID features (the TF-FID InceptionV3 of 2015-12-05, as converted by torch-fidelity)",
    ),
}


class MissingPretrainedWeights(FileNotFoundError):
    """A pretrained weights file is not on disk and could not be downloaded."""

    def __init__(self, name: str, path: Path, url: str, reason: str):
        self.name, self.path, self.url, self.reason = name, path, url, reason
        spec = PRETRAINED[name]
        if spec.package is not None:
            how = f"it ships inside the '{spec.package}' package: reinstall that package (source: {url})"
        else:
            how = (
                f"download it from {url} and place it in that directory (or point TORCH_HOME at a directory "
                "whose hub/checkpoints holds it)"
            )
        super().__init__(
            f"Pretrained weights '{name}' ({spec.used_for}) are missing: expected the file '{path.name}' in the "
            f"directory '{path.parent}'; {how}. ({reason})"
        )

    def __reduce__(self):  # picklable across processes (e.g. a Dagster step worker) despite the custom __init__
        return type(self), (self.name, self.path, self.url, self.reason)


def hub_checkpoint_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints``: honours ``TORCH_HOME`` and ``torch.hub.set_dir``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def expected_path(name: str) -> Path:
    """Where the file for component ``name`` must be (whether or not it is there)."""
    spec = _spec(name)
    if spec.package is not None:
        found = importlib.util.find_spec(spec.package)
        if found is None or found.origin is None:
            # Not installed: report the path relative to a placeholder so the message still names the file.
            return Path(f"<{spec.package} not installed>") / spec.package_path
        return Path(found.origin).parent / spec.package_path
    return hub_checkpoint_dir() / spec.filename


def resolve(name: str, download: bool = True) -> Path:
    """The local path of component ``name``'s weights, downloading them first if allowed and possible.

    Raises :class:`MissingPretrainedWeights` (naming the file, the directory and the URL) when the file is absent and
    either ``download`` is False, the file ships inside a package, or the host cannot be reached within
    :data:`CONNECT_TIMEOUT_S` seconds.
    """
    spec = _spec(name)
    path = expected_path(name)
    if path.is_file():
        return path
    if spec.package is not None:
        raise MissingPretrainedWeights(name, path, spec.url, "packaged file not found")
    if not download:
        raise MissingPretrainedWeights(name, path, spec.url, "download=False")

    reachable, why = _reachable(spec.url, CONNECT_TIMEOUT_S)
    if not reachable:
        raise MissingPretrainedWeights(name, path, spec.url, f"download not possible: {why}")
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s -> %s", spec.url, path)
    try:
        # Writes to a temporary file and renames, so an interrupted download never leaves a truncated checkpoint.
        torch.hub.download_url_to_file(spec.url, str(path), hash_prefix=spec.hash_prefix, progress=False)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the caller: the file is missing
        raise MissingPretrainedWeights(name, path, spec.url, f"download failed: {type(e).__name__}: {e}") from e
    return path


class WeightsStatus(NamedTuple):
    name: str
    path: Path
    present: bool
    used_for: str


def status() -> list[WeightsStatus]:
    """One row per registered component: where its file must be and whether it is there (for ``ldm weights``)."""
    rows = []
    for name, spec in PRETRAINED.items():
        path = expected_path(name)
        rows.append(WeightsStatus(name, path, path.is_file(), spec.used_for))
    return rows


def _spec(name: str) -> PretrainedFile:
    try:
        return PRETRAINED[name]
    except KeyError:
        raise KeyError(f"unknown pretrained component {name!r}; known: {sorted(PRETRAINED)}") from None


def _reachable(url: str, timeout: float) -> tuple[bool, str]:
    """Whether a TCP connection to the URL's host (or the configured HTTPS proxy) opens within ``timeout`` seconds.

    Runs in a daemon thread so that a slow DNS resolver cannot stretch the wait either: ``create_connection``'s
    timeout covers the connect, not the name lookup.
    """
    source = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(source.scheme)
    if proxy and not urllib.request.proxy_bypass(source.hostname or ""):
        target = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    else:
        target = source
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    result: list[tuple[bool, str]] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append((True, ""))
        except OSError as e:
            result.append((False, f"cannot connect to {host}:{port} ({e})"))

    thread = threading.Thread(target=probe, daemon=True, name="pretrained-reachability")
    thread.start()
    thread.join(timeout + 1.0)
    if not result:
        return False, f"no answer from {host}:{port} within {timeout:.0f} s"
    return result[0]


__all__ = [
    "CONNECT_TIMEOUT_S",
    "MissingPretrainedWeights",
    "PRETRAINED",
    "PretrainedFile",
    "WeightsStatus",
    "expected_path",
    "hub_checkpoint_dir",
    "resolve",
    "status",
]
