"""The code location: everything under pipeline/defs/, loaded by Dagster's own project layout (`dg list defs`,
`dg check defs`, `dg dev`; and `dagster dev -w workspace.yaml`, `dagster job execute -m pipeline.definitions`)."""

from pathlib import Path

import dagster as dg

defs = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)


def get_training_job() -> dg.JobDefinition:
    """For `dg.reconstructable` (ldm demo, tests): the resolved ldm_training_job."""
    return defs.resolve_job_def("ldm_training_job")
