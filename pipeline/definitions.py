"""The code location: everything under pipeline/defs/, loaded by Dagster's own project layout (`dg list defs`,
`dg check defs`, `dg dev`; and `dagster dev -w workspace.yaml`, `dagster job execute -m pipeline.definitions`)."""

import warnings
from pathlib import Path

import dagster as dg

import pipeline.defs

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _load() -> dg.Definitions:
    if (PROJECT_ROOT / "pyproject.toml").exists():  # a checkout, or an editable install: the dg project
        return dg.load_from_defs_folder(path_within_project=PROJECT_ROOT)
    # installed as a package (a container image's site-packages has no pyproject.toml): the same folder, by module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        return dg.load_defs(pipeline.defs, project_root=PROJECT_ROOT)


defs = _load()


def get_training_job() -> dg.JobDefinition:
    """For `dg.reconstructable` (ldm demo, tests): the resolved ldm_training_job."""
    return defs.resolve_job_def("ldm_training_job")
