"""Where a pretrained diffusers component (a ``save_pretrained`` folder) is found: a local folder, any fsspec URL
(``s3://…``, copied to a temporary folder first, since diffusers reads local files), or a Hugging Face repo id looked
up in the local Hugging Face cache only. Nothing is ever downloaded from the Hub: this pipeline runs offline, and a
run's inputs must not change under it because the Hub did.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from ldm_core import storage

DIFFUSERS_CONFIG = "config.json"
"""The file every diffusers model folder has (``_class_name`` names the class that wrote it)."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PretrainedSourceNotFound(FileNotFoundError):
    """A pretrained source that is nowhere it was looked for; ``str(e)`` is one line naming those places."""


def describe(source: str, subfolder: str | None) -> str:
    """The source as a user wrote it, less any credentials in its URL: ``s3://b/sd (subfolder vae)``."""
    source = storage.redact_url(source)
    return f"{source} (subfolder {subfolder})" if subfolder else source


def is_remote(source: str) -> bool:
    return not storage.is_local(source)


def _missing(source: str, subfolder: str | None, looked: list[str]) -> PretrainedSourceNotFound:
    return PretrainedSourceNotFound(
        f"pretrained source {describe(source, subfolder)!r} not found: looked for {' and '.join(looked)}"
    )


def _hf_snapshot(repo_id: str) -> Path | None:
    """The local cache's snapshot of ``repo_id`` (its default revision), or None when the cache has none."""
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None


def local_folder(source: str, subfolder: str | None = None) -> Path:
    """The local folder of a local or Hugging Face source (its subfolder joined), holding a diffusers config.

    A path that is not a folder, and that looks like ``owner/name``, is looked up in the Hugging Face cache
    (``HF_HUB_CACHE``). Raises `PretrainedSourceNotFound` naming every place it looked.
    """
    path = Path(storage.local_path(source)).expanduser()
    looked = [f"the folder {path.resolve() / (subfolder or '') / DIFFUSERS_CONFIG}"]
    if path.is_dir():
        folder = path / (subfolder or "")
        if (folder / DIFFUSERS_CONFIG).is_file():
            return folder
        raise _missing(source, subfolder, looked)
    if _REPO_ID.match(source) and not os.path.isabs(source):
        looked.append(
            f"a snapshot of Hugging Face repo {source!r} in the local cache {hf_constants.HF_HUB_CACHE} "
            "(offline: nothing is downloaded)"
        )
        snapshot = _hf_snapshot(source)
        if snapshot is not None and (snapshot / (subfolder or "") / DIFFUSERS_CONFIG).is_file():
            return snapshot / (subfolder or "")
    raise _missing(source, subfolder, looked)


def _copy_remote(url: str, dest: Path, storage_options: dict[str, Any] | None) -> None:
    """Every file under ``url`` into ``dest`` (streamed, not held in memory: a VAE's weights are hundreds of MB)."""
    fs, root = storage.get_fs(url, storage_options)
    for rel in storage.walk_files(url, storage_options):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with storage.naming_errors(url, "copying"):
            fs.get_file(f"{root.rstrip('/')}/{rel}", str(target))


@contextlib.contextmanager
def local_copy(
    source: str, subfolder: str | None = None, storage_options: dict[str, Any] | None = None
) -> Iterator[Path]:
    """A local folder with the source's files, for diffusers' ``from_pretrained``: the folder itself when it is local
    or cached, else a temporary copy of the remote one (removed on exit)."""
    if not is_remote(source):
        yield local_folder(source, subfolder)
        return
    url = storage.join(source, subfolder) if subfolder else source
    if not storage.exists(storage.join(url, DIFFUSERS_CONFIG), storage_options):
        raise _missing(source, subfolder, [storage.redact_url(storage.join(url, DIFFUSERS_CONFIG))])
    with tempfile.TemporaryDirectory(prefix="ldm-pretrained-") as tmp:
        _copy_remote(url, Path(tmp), storage_options)
        yield Path(tmp)


def read_diffusers_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / DIFFUSERS_CONFIG).read_text())


__all__ = [
    "DIFFUSERS_CONFIG",
    "PretrainedSourceNotFound",
    "describe",
    "is_remote",
    "local_copy",
    "local_folder",
    "read_diffusers_config",
]
