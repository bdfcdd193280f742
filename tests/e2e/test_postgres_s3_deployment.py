"""The deployment's topology for real, on one machine: Postgres + S3 behind Dagster and MLflow.

A PostgreSQL cluster of its own (Debian's package, `make system-deps` installs it) in a temp dir on 127.0.0.1 holds
Dagster's storage (deploy/dagster.yaml through dagster-postgres) and the backend store of an ``mlflow server`` that
keeps its artifacts on an S3 endpoint (moto, standing in for MinIO); the pipeline's storage root is on the same S3.
The environment is docker-compose.yaml's own (``x-ldm-env``) with its hosts pointed at these services, so a wrong
variable there fails here. The whole tiny pipeline is materialized, then each store is checked where it lives.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.common import answers, free_port, wait_for
from tests.e2e.helpers import ROOT, materialized_metadata

DEPLOY = ROOT / "deploy"
PG_USER = "ldm"


# ---------------------------------------------------------------------------------------------------------------
# PostgreSQL: a cluster of our own, as a non-root user (postgres refuses to run as root)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Postgres:
    port: int

    def url(self, db: str, driver: str = "") -> str:
        return f"postgresql{driver}://{PG_USER}@127.0.0.1:{self.port}/{db}"


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip(
            "PostgreSQL is not installed and could not be: `make test` runs `apt-get install -y postgresql` "
            "(make system-deps); install it to run the Postgres deployment test"
        )
    bindir = Path(bins[-1]).parent
    as_user: list[str] = []
    if os.geteuid() == 0:  # CI runs as root: run the server as the package's `postgres` user
        as_user = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="ldm-pg-", dir="/tmp"))  # /tmp: traversable by that user
    if as_user:
        shutil.chown(base, "postgres")
    data, log = base / "data", base / "server.log"
    port = free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)

    run(str(bindir / "initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync")
    run(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(log),
        "-w",
        "-t",
        "60",
        "start",
        "-o",
        f"-h 127.0.0.1 -p {port} -k {base} -c fsync=off",
    )
    try:
        for db in ("dagster", "mlflow"):
            run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, db)
        yield Postgres(port)
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# The MLflow server of docker-compose.yaml (Postgres backend store, artifacts proxied to S3)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(postgres, s3_endpoint, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """(tracking URI, the S3 URL of the artifact destination)."""
    port = free_port()
    artifacts = s3_endpoint.url("deploy-test", "mlflow")
    log = tmp_path_factory.mktemp("mlflow") / "server.log"
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint.endpoint_url}
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                mlflow_bin,
                "server",
                f"--backend-store-uri={postgres.url('mlflow', '+psycopg2')}",
                "--serve-artifacts",
                f"--artifacts-destination={artifacts}",
                "--host=127.0.0.1",
                f"--port={port}",
                "--workers=1",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for("mlflow server", lambda: answers(f"{uri}/health", timeout=2), 120, proc, log)
        yield uri, artifacts
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------------------------------------------------------
# The pipeline with docker-compose's environment
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployed_run(postgres, s3_endpoint, mlflow_server, tiny_config, tmp_path_factory):
    import dagster as dg

    tracking_uri, _ = mlflow_server
    compose = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())
    env = {k: str(v) for k, v in compose["x-ldm-env"].items()}
    home = tmp_path_factory.mktemp("deploy_home")
    dagster_home = home / "dagster"
    dagster_home.mkdir()
    shutil.copy(DEPLOY / "dagster.yaml", dagster_home / "dagster.yaml")
    # compose's services, found where this test runs them; every other value is compose's own
    env.update(
        {
            "DAGSTER_HOME": str(dagster_home),
            "DAGSTER_POSTGRES_HOST": "127.0.0.1",
            "DAGSTER_POSTGRES_PORT": str(postgres.port),
            "DAGSTER_POSTGRES_PASSWORD": "",
            "MLFLOW_TRACKING_URI": tracking_uri,
            "LDM_STORAGE_ROOT": s3_endpoint.url("deploy-test", "storage"),
            "AWS_ENDPOINT_URL": s3_endpoint.endpoint_url,
            "LDM_HOME": str(home),
            "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
        }
    )
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    try:
        from pipeline.definitions import defs

        with dg.DagsterInstance.get() as instance:
            result = defs.resolve_job_def("ldm_training_job").execute_in_process(
                run_config=tiny_config, instance=instance
            )
            storage_kind = type(instance.run_storage).__name__
        assert result.success
        yield result, storage_kind, env
    finally:
        mp.undo()


def _query(postgres: Postgres, db: str, sql: str, *args) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(postgres.url(db)) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


@pytest.mark.slow
def test_dagster_keeps_runs_and_events_in_postgres(deployed_run, postgres):
    result, storage_kind, _ = deployed_run
    assert storage_kind == "PostgresRunStorage"
    [(status,)] = _query(postgres, "dagster", "select status from runs where run_id = %s", result.run_id)
    assert status == "SUCCESS"
    materialized = _query(
        postgres,
        "dagster",
        "select distinct asset_key from event_logs where run_id = %s and dagster_event_type = 'ASSET_MATERIALIZATION'",
        result.run_id,
    )
    assert {k for (k,) in materialized} == {
        f'["{a}"]' for a in ("image_dataset", "vae_model", "latent_store", "ldm_model", "evaluation_report")
    }


@pytest.mark.slow
def test_mlflow_registry_in_postgres_and_artifacts_on_s3(deployed_run, postgres, mlflow_server):
    import s3fs
    from mlflow.tracking import MlflowClient

    _, _, env = deployed_run
    tracking_uri, artifacts = mlflow_server
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    ldm = client.get_model_version_by_alias("ldm", "champion")
    vae = client.get_model_version_by_alias("ldm-vae", "candidate")
    names = {n for (n,) in _query(postgres, "mlflow", "select name from registered_models")}
    assert names == {"ldm", "ldm-vae"}
    exp = client.get_experiment_by_name("ldm-pipeline")
    assert exp.artifact_location == env["LDM_MLFLOW_ARTIFACTS"]  # compose's setting, served from S3
    # the registered models' files are objects on S3 under the server's --artifacts-destination
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for mv in (ldm, vae):
        location = client.get_model_version_download_uri(mv.name, mv.version)  # mlflow-artifacts:/<path>
        assert location.startswith("mlflow-artifacts:/"), location
        on_s3 = f"{artifacts}/{location.removeprefix('mlflow-artifacts:/').lstrip('/')}"
        assert fs.exists(f"{on_s3}/MLmodel"), f"{mv.name} v{mv.version}: no MLmodel at {on_s3}"
        assert fs.find(on_s3), on_s3


@pytest.mark.slow
def test_the_storage_root_is_on_s3(deployed_run):
    from ldm_core import storage

    result, _, env = deployed_run
    root = env["LDM_STORAGE_ROOT"]
    vae_url = materialized_metadata(result, "vae_model")["vae_url"]
    store_url = materialized_metadata(result, "latent_store")["store_url"]
    assert vae_url.startswith(root) and store_url.startswith(root)
    assert storage.exists(storage.join(vae_url, "model.safetensors"))
    assert materialized_metadata(result, "evaluation_report")["gate_passed"] is True
