"""deploy/ parses, validates and names what this repository builds: the image, its commands, its settings.

The Postgres/S3 test (tests/e2e/test_postgres_s3_deployment.py) runs the instance and the environment for real;
here every file is checked without services: Dagster's own schema for dagster.yaml, and cross-references between
the Dockerfile, docker-compose.yaml, workspace.yaml, the Helm values and the code (settings, executors, op tags).
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.common import ROOT

DEPLOY = ROOT / "deploy"
IMAGE = "ldm-pipeline"
GRPC = ["dagster", "api", "grpc", "-m", "pipeline.definitions"]


def _yaml(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _env_refs(node) -> set[str]:
    """Every `{env: NAME}` in a Dagster config tree."""
    if isinstance(node, dict):
        if set(node) == {"env"}:
            return {node["env"]}
        return set().union(*(_env_refs(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_env_refs(v) for v in node)) if node else set()
    return set()


def _compose_env() -> dict[str, str]:
    return {k: str(v) for k, v in _yaml("docker-compose.yaml")["x-ldm-env"].items()}


def _dockerfile_cmd() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    return json.loads(re.search(r"^CMD (\[.*\])$", text, re.MULTILINE).group(1))


# ---------------------------------------------------------------------------------------------------------------


def test_dagster_yaml_validates_against_dagsters_schema(tmp_path, monkeypatch):
    from dagster._core.instance.config import dagster_instance_config

    shutil.copy(DEPLOY / "dagster.yaml", tmp_path / "dagster.yaml")
    for var in _env_refs(_yaml("dagster.yaml")):
        monkeypatch.setenv(var, "5432" if var.endswith("PORT") else "x")
    config, custom_class = dagster_instance_config(str(tmp_path))
    assert custom_class is None
    assert "postgres" in config["storage"]
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["pools"]["default_limit"] >= 1
    _assert_retries_and_slot_cleanup(config)


def _assert_retries_and_slot_cleanup(config: dict) -> None:
    """A run whose worker died is retried (step failures have their own RetryPolicy), and the `gpu` pool slot a
    killed run still holds is freed."""
    assert config["run_retries"]["enabled"] and config["run_retries"]["max_retries"] >= 1
    assert config["run_retries"]["retry_on_asset_or_op_failure"] is False
    assert config["run_monitoring"]["enabled"] and config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0


def test_helm_daemon_retries_runs_and_frees_pool_slots_as_dagster_yaml_does():
    daemon = _yaml("helm/values.yaml")["dagsterDaemon"]
    retries, monitoring = daemon["runRetries"], daemon["runMonitoring"]
    _assert_retries_and_slot_cleanup(
        {
            "run_retries": {
                "enabled": retries["enabled"],
                "max_retries": retries["maxRetries"],
                "retry_on_asset_or_op_failure": retries["retryOnAssetOrOpFailure"],
            },
            "run_monitoring": {
                "enabled": monitoring["enabled"],
                "free_slots_after_run_end_seconds": monitoring["freeSlotsAfterRunEndSeconds"],
            },
        }
    )


def test_the_local_instance_frees_the_gpu_slot_of_a_killed_run(tmp_path):
    """`ldm` writes LDM_HOME's instance (`dagster dev` under `ldm ui` runs its daemon): valid for Dagster, with the
    slot cleanup a laptop's pool limit of 1 needs."""
    from dagster._core.instance.config import dagster_instance_config

    from pipeline.cli import DAGSTER_YAML

    (tmp_path / "dagster.yaml").write_text(DAGSTER_YAML)
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0


def test_every_setting_dagster_yaml_needs_is_set_by_compose():
    needed = _env_refs(_yaml("dagster.yaml"))
    assert needed == {f"DAGSTER_POSTGRES_{k}" for k in ("HOST", "PORT", "USER", "PASSWORD", "DB")}
    env = _compose_env()
    assert needed <= set(env)
    # and the pipeline's own settings (pipeline/settings.py) point at Postgres-backed MLflow and S3, not LDM_HOME
    settings_vars = set(re.findall(r'os\.environ\.get\("([A-Z_]+)"', (ROOT / "pipeline" / "settings.py").read_text()))
    assert {"MLFLOW_TRACKING_URI", "LDM_MLFLOW_ARTIFACTS", "LDM_STORAGE_ROOT", "DAGSTER_HOME"} <= settings_vars
    assert {
        "MLFLOW_TRACKING_URI",
        "LDM_MLFLOW_ARTIFACTS",
        "LDM_STORAGE_ROOT",
        "DAGSTER_HOME",
        "AWS_ENDPOINT_URL",
    } <= set(env)
    assert env["LDM_STORAGE_ROOT"].startswith("s3://") and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_compose_runs_the_image_this_repo_builds_with_its_commands():
    compose = _yaml("docker-compose.yaml")
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "code", "webserver", "daemon"} <= set(services)
    built = [s for s in services.values() if "build" in s]
    assert {s["image"] for s in built} == {f"{IMAGE}:latest"}
    for s in built:
        assert (DEPLOY / s["build"]["context"] / s["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert services["code"]["command"][: len(GRPC)] == GRPC
    assert services["code"]["command"] == _dockerfile_cmd()  # the image's default command is the code location
    assert services["webserver"]["command"][0] == "dagster-webserver"
    assert services["daemon"]["command"][:2] == ["dagster-daemon", "run"]
    assert services["minio"]["image"].startswith("minio/minio")
    assert services["code"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # MLflow: Postgres backend store, artifacts in the S3 bucket that create-bucket makes
    mlflow = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri=postgresql+psycopg2://" in mlflow and "--artifacts-destination=s3://ldm/" in mlflow
    assert "mc mb --ignore-existing local/ldm" in " ".join(services["create-bucket"]["command"])
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == _compose_env()["AWS_ENDPOINT_URL"]
    # every console script the services run is installed by the project (same environment as the image)
    venv_bin = Path(shutil.which("dagster") or ROOT / ".venv" / "bin" / "dagster").parent
    for cmd in ("dagster", "dagster-webserver", "dagster-daemon", "mlflow"):
        assert (venv_bin / cmd).exists(), cmd
    # the workspace the webserver and daemon load is the code service's gRPC port
    ws = _yaml("workspace.yaml")["load_from"][0]["grpc_server"]
    assert (
        ws["host"] == "code"
        and str(ws["port"]) == services["code"]["command"][services["code"]["command"].index("-p") + 1]
    )


def test_dockerfile_copies_what_exists_and_installs_the_project_with_the_k8s_extra():
    text = (DEPLOY / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", text, re.MULTILINE):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which is not in the repository"
    assert 'pip install ".[k8s]"' in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "k8s" in project["optional-dependencies"]
    assert project["scripts"]["ldm"] == "pipeline.cli:main"  # `ldm sample` in the container (deploy/README.md)
    assert "ldm sample" in (DEPLOY / "README.md").read_text()
    deps = " ".join(project["dependencies"])
    assert "dagster-postgres" in deps and "psycopg2-binary" in deps and "dagster-k8s" not in deps


def test_helm_values_name_the_code_location_the_k8s_launcher_and_the_gpu_steps():
    from pipeline.asset_common import GPU_OP_TAGS
    from pipeline.definitions import defs

    values = _yaml("helm/values.yaml")
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["image"]["repository"].endswith(f"/{IMAGE}")
    assert ["dagster", "api", "grpc", *deployment["dagsterApiGrpcArgs"]] == GRPC
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["LDM_EXECUTOR"] == "k8s" and env["LDM_STORAGE_ROOT"].startswith("s3://")
    assert {"MLFLOW_TRACKING_URI", "LDM_MLFLOW_ARTIFACTS"} <= set(env)
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert values["concurrency"]["enabled"] and values["concurrency"]["pools"]["defaultLimit"] >= 1
    assert values["postgresql"]["postgresqlDatabase"] == "dagster"
    # the same driver as deploy/dagster.yaml, which the Postgres deployment test runs for real
    assert (
        values["postgresql"]["postgresqlScheme"]
        == _yaml("dagster.yaml")["storage"]["postgres"]["postgres_db"]["scheme"]
    )
    # the GPU steps: what the values promise is what the GPU assets' op tags carry
    for key in ("vae_model", "ldm_model"):
        tags = defs.resolve_assets_def(key).node_def.tags  # Dagster stores the dict as JSON
        assert json.loads(tags["dagster-k8s/config"]) == GPU_OP_TAGS["dagster-k8s/config"]
    k8s = GPU_OP_TAGS["dagster-k8s/config"]
    assert k8s["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert k8s["pod_spec_config"]["node_selector"] and k8s["pod_spec_config"]["tolerations"]


def test_the_executor_comes_from_the_environment(monkeypatch):
    import dagster as dg

    from pipeline.executors import executor_from_env

    monkeypatch.delenv("LDM_EXECUTOR", raising=False)
    assert executor_from_env() is dg.in_process_executor
    monkeypatch.setenv("LDM_EXECUTOR", "multiprocess")
    assert executor_from_env() is dg.multiprocess_executor
    monkeypatch.setenv("LDM_EXECUTOR", "k8s")
    try:
        import dagster_k8s  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="k8s extra"):
            executor_from_env()
    else:
        assert executor_from_env().name == "k8s"
    monkeypatch.setenv("LDM_EXECUTOR", "celery")
    with pytest.raises(ValueError, match="not one of"):
        executor_from_env()


# ---------------------------------------------------------------------------------------------------------------
# Kubernetes: the pod a step gets, merged by dagster-k8s' own code
# ---------------------------------------------------------------------------------------------------------------

# The chart writes runK8sConfig's sections into the instance's run_k8s_config under these names
# (helm/dagster/templates/helpers/instance/_run-launcher.tpl); the k8s config inside each is passed on as written.
HELM_RUN_K8S_SECTIONS = {
    "containerConfig": "container_config",
    "podSpecConfig": "pod_spec_config",
    "podTemplateSpecMetadata": "pod_template_spec_metadata",
    "jobSpecConfig": "job_spec_config",
    "jobMetadata": "job_metadata",
}
GPU_STEPS = ("vae_model", "latent_store", "ldm_model", "evaluation_report")


def _step_pod(asset: str):
    """The pod spec of ``asset``'s step under the k8s executor, as dagster-k8s builds it from deploy/helm/values.yaml
    and the asset's op tags, serialized as it is sent to the API server (`K8sStepHandler._get_container_context`: the
    run launcher's run_k8s_config, then the executor's step config, then the step's `dagster-k8s/config` tag, each
    merged onto the one before)."""
    import kubernetes
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        UserDefinedDagsterK8sConfig,
        construct_dagster_k8s_job,
        get_user_defined_k8s_config,
    )

    from pipeline.definitions import defs

    launcher = _yaml("helm/values.yaml")["runLauncher"]["config"]["k8sRunLauncher"]
    run_k8s_config = {HELM_RUN_K8S_SECTIONS[k]: v for k, v in (launcher.get("runK8sConfig") or {}).items()}
    step_tags = defs.resolve_assets_def(asset).node_def.tags  # strings, as the step handler reads them
    context = (
        K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(run_k8s_config))
        .merge(K8sContainerContext())  # the executor's step_k8s_config: none in the values
        .merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step_tags)))
    )
    job = construct_dagster_k8s_job(
        job_config=DagsterK8sJobConfig(
            job_image=f"registry.example.com/{IMAGE}:0.1.0", dagster_home="/opt/dagster/dagster_home"
        ),
        args=["dagster", "api", "execute_step"],
        job_name=f"dagster-step-{asset}",
        pod_name=f"dagster-step-{asset}",
        user_defined_k8s_config=context.run_k8s_config,
        component="step_worker",
    )
    return kubernetes.client.ApiClient().sanitize_for_serialization(job.spec.template.spec)


@pytest.mark.parametrize("asset", GPU_STEPS)
def test_a_gpu_step_pod_asks_only_for_a_gpu_node(asset):
    """The run pod's CPU node selector and memory limit must not reach a GPU step: a pod that asks for a CPU node and
    a GPU node at once, or squeezes a training step into the run pod's memory, never runs."""
    pod = _step_pod(asset)
    (container,) = pod["containers"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}


def test_a_cpu_step_pod_keeps_the_run_pod_settings():
    run_k8s = _yaml("helm/values.yaml")["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    pod = _step_pod("image_dataset")
    assert pod["nodeSelector"] == run_k8s["podSpecConfig"]["nodeSelector"]
    assert pod["containers"][0]["resources"] == run_k8s["containerConfig"]["resources"]


def test_helm_uses_the_postgres_secret_the_readme_creates():
    """deploy/README.md has the operator create the Postgres password secret first; a chart that also generates
    it fails the install on the existing secret."""
    values = _yaml("helm/values.yaml")
    assert values.get("generatePostgresqlPasswordSecret", True) is False  # the chart's default is True
    secret = values["global"]["postgresqlSecretName"]
    assert f"create secret generic {secret} --from-literal=postgresql-password=" in (DEPLOY / "README.md").read_text()


@pytest.mark.parametrize("asset", [*GPU_STEPS, "image_dataset"])
def test_every_step_pod_gives_a_stopping_training_more_time_than_the_training_takes(asset):
    """SIGTERM to SIGKILL: the pod's grace must exceed the time a training step is given to checkpoint and stop
    (`ComputeResource.termination_grace_s`), or a preempted step is killed before it commits its checkpoint."""
    from pipeline.resources import ComputeResource

    grace = _step_pod(asset)["terminationGracePeriodSeconds"]
    assert grace > ComputeResource().termination_grace_s + 30
