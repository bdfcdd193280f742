"""The version floors in pyproject.toml admit no release that lacks what the code uses.

Each feature below is named by the text that uses it (so the test notices when the usage goes away) and the first
release that has it; a floor below that release would let pip install a Dagster or an MLflow the code cannot run on.
Dagster's libraries (dagster-postgres, dagster-k8s) are versioned 0.(minor + 16) beside dagster 1.minor and pin
their exact dagster release, so their floors follow dagster's.
"""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.common import ROOT

# (package, first release with the feature, where the code uses it, a regex of the text that uses it)
FEATURES = [
    ("dagster", "1.10", "pipeline/asset_common.py", r"\"pool\": GPU_POOL"),  # @asset(pool=): concurrency pools
    ("mlflow", "3.0", "pipeline/resources.py", r"log_model\(\s*name="),  # log_model(name=) (was artifact_path)
    ("mlflow", "3.5", "deploy/docker-compose.yaml", r"--allowed-hosts="),  # the server's host-header check
    # the system metrics monitor logging into a given store (3.6 and before: into MLflow's process-wide one)
    ("mlflow", "3.7", "pipeline/tracking.py", r"SystemMetricsMonitor\([^)]*\btracking_uri="),
    # the zarr 3 store API (zarr 2 has neither LocalStore nor FsspecStore nor Group.create_array)
    ("zarr", "3.0", "ldm_core/data/latent_store/backends.py", r"zarr\.storage\.LocalStore\("),
    ("zarr", "3.0", "ldm_core/data/latent_store/backends.py", r"\.create_array\("),
    # from_pretrained(dtype=) arrived in 4.56 (before it: torch_dtype=)
    ("transformers", "4.56", "ldm_core/text_encoder.py", r"from_pretrained\([^)]*\bdtype=dtype"),
    # LoRA through peft: peft 0.17 fails at import beside transformers 5 (which the transformers floor admits); 0.18.0
    # runs tests/core/test_lora.py, checked with it installed over the venv's
    ("peft", "0.18", "ldm_core/lora.py", r"inject_adapter_in_model\("),
]
DAGSTER_LIBRARIES = ("dagster-postgres", "dagster-k8s")
DAGSTER_PACKAGES = ("dagster-webserver", "dagster-pipes")


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    reqs: dict[str, Requirement] = {}
    for line in lines:
        req = Requirement(line)
        reqs.setdefault(req.name, req)
    return reqs


def _floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert floors, f"{req} has no lower bound"
    return max(floors)


@pytest.mark.parametrize("package, needed, path, usage", FEATURES, ids=[f"{f[0]}>={f[1]}" for f in FEATURES])
def test_floor_admits_only_releases_with_the_features_the_code_uses(package, needed, path, usage):
    assert re.search(usage, (ROOT / path).read_text()), f"{path} no longer matches {usage!r}: update this table"
    req = _requirements()[package]
    assert _floor(req) >= Version(needed), (
        f"{path} matches {usage!r}, which needs {package}>={needed}; pyproject.toml says {req}"
    )


def test_dagster_packages_share_dagsters_floor():
    reqs = _requirements()
    dagster = _floor(reqs["dagster"])
    for name in DAGSTER_PACKAGES:
        assert _floor(reqs[name]) >= dagster, f"{reqs[name]} is below dagster's floor {dagster}"
    for name in DAGSTER_LIBRARIES:
        assert _floor(reqs[name]) >= Version(f"0.{dagster.minor + 16}"), (
            f"{reqs[name]} admits a release built for a dagster below {dagster}"
        )
