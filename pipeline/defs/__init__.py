"""The Dagster definitions, loaded by `dg.load_from_defs_folder` (`pipeline/definitions.py`): one folder per asset, and
one module each for what the assets share.

    <asset>/asset.py       the asset: typed config in, one call into ldm_core per phase, its record out
    <asset>/config.py      its run config (``ops.<asset>.config``)
    <asset>/record.py      what it hands downstream (`pipeline.upstream.AssetRecord`)
    <asset>/checks.py      its asset checks (where it has any)
    <asset>/validation.py  its part of validating a run config before any work starts (`pipeline.validation`)
    jobs.py                the jobs, the weekly schedule and the new-data sensor
    mlflow_runs.py         the hooks and run-status sensors that end each Dagster run's MLflow parent run
    resources.py           the resources every run gets, and the executor
"""
