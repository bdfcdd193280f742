"""A temporary TORCH_HOME for the tests of pretrained weights (present, missing, downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def use_torch_home(mp: pytest.MonkeyPatch, home: Path) -> Path:
    """Point torch.hub at ``home`` (via TORCH_HOME, and clear any set_dir override); returns the checkpoint dir."""
    mp.setenv("TORCH_HOME", str(home))
    mp.setattr(torch.hub, "_hub_dir", None)
    return home / "hub" / "checkpoints"
