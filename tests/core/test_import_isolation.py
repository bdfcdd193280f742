"""ldm_core imports neither dagster, nor mlflow, nor the pipeline: dependencies point one way, pipeline -> ldm_core."""

import subprocess
import sys

from tests.common import ROOT
from tests.test_import_graph import import_graph

FORBIDDEN = ("dagster", "mlflow", "pipeline")

SCRIPT = r"""
import importlib, pkgutil, sys
import ldm_core
names = [m.name for m in pkgutil.walk_packages(ldm_core.__path__, "ldm_core.")]
for name in names:
    importlib.import_module(name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
print(len(names))
print(",".join(bad))
"""


def test_importing_ldm_core_loads_neither_dagster_mlflow_nor_the_pipeline():
    script = f"FORBIDDEN = {FORBIDDEN!r}\n{SCRIPT}"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split("\n")
    n_modules, bad = int(out[0]), out[1]
    assert n_modules >= 5, "walked too few modules: the check would be vacuous"
    assert bad == "", f"ldm_core pulled in: {bad}"


def test_no_ldm_core_module_imports_the_pipeline_even_inside_a_function():
    graph = import_graph(ROOT)
    core = {m: deps for m, deps in graph.items() if m.split(".")[0] == "ldm_core"}
    assert len(core) >= 5
    bad = {m: sorted(d for d in deps if d.split(".")[0] != "ldm_core") for m, deps in core.items()}
    assert not {m: d for m, d in bad.items() if d}, "ldm_core imports outside itself"
