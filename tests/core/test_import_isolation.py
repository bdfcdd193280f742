"""ldm_core must import neither dagster nor mlflow: dependencies point one way, pipeline -> ldm_core."""

import subprocess
import sys

SCRIPT = r"""
import importlib, pkgutil, sys
import ldm_core
names = [m.name for m in pkgutil.walk_packages(ldm_core.__path__, "ldm_core.")]
for name in names:
    importlib.import_module(name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("dagster", "mlflow"))
print(len(names))
print(",".join(bad))
"""


def test_ldm_core_imports_neither_dagster_nor_mlflow():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout.split("\n")
    n_modules, bad = int(out[0]), out[1]
    assert n_modules >= 5, "walked too few modules: the check would be vacuous"
    assert bad == "", f"ldm_core pulled in: {bad}"
