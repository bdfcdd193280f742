"""A Dagster job killed during training and run again resumes from its checkpoint instead of starting over.

`dagster_kill_trial` runs ``dagster job execute -m pipeline.definitions -j ldm_training_job -c <config>`` in a fresh
LDM_HOME, SIGKILLs it once the training asset's checkpoint directory (keyed on data + config) holds a committed
checkpoint at or past ``kill_at_step``, checks that the registry holds no version of that model yet (it never points
at an unfinished one), runs the same command again to the end, and compares the registered weights with an
uninterrupted training of the same config on the same data (in this process, bit for bit).

- ``asset="vae_model"``: killed during autoencoder training; the rerun's vae_model says ``resumed_from`` > 0.
- ``asset="ldm_model"``: killed during denoiser training, after vae_model and latent_store completed; the rerun
  reuses the registered autoencoder (no new version), so the latent store has nothing to encode and the LDM
  resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "e2e" / "tiny.yaml"
BIN = Path(sys.executable).parent
REGISTERED = {"vae_model": "ldm-vae", "ldm_model": "ldm"}
STAGE = {"vae_model": "vae", "ldm_model": "ldm"}


def kill_config(vae_steps: int = 24, only_vae: bool = False, ldm_steps: int | None = None) -> dict[str, Any]:
    """tiny.yaml with a longer training that checkpoints often: vae_model (``vae_steps``, every 2 steps) and, when
    ``ldm_steps`` is set, ldm_model (every 5). ``only_vae``: the image_dataset and vae_model sections alone, for a
    run of the op selection ``*vae_model``."""
    cfg = copy.deepcopy(yaml.safe_load(TINY.read_text()))
    cfg["ops"]["vae_model"]["config"]["training"]["trainer"].update(
        {"steps": vae_steps, "checkpoint_every": 2, "log_every": 4}
    )
    if ldm_steps:
        cfg["ops"]["ldm_model"]["config"]["training"]["trainer"].update(
            {"steps": ldm_steps, "checkpoint_every": 5, "log_every": 5}
        )
    if only_vae:
        cfg["ops"] = {k: v for k, v in cfg["ops"].items() if k in ("image_dataset", "vae_model")}
    return cfg


def fresh_home(path: Path) -> Path:
    (path / "dagster").mkdir(parents=True, exist_ok=True)
    (path / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return path


def home_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("LDM_STORAGE_ROOT", "LDM_MLFLOW_ARTIFACTS", "LDM_RUN_CONFIG"):
        env.pop(var, None)
    env.update(
        {
            "LDM_HOME": str(home),
            "DAGSTER_HOME": str(home / "dagster"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            # one torch thread: fast on a busy shared box, and the references below train with the same
            "OMP_NUM_THREADS": "1",
        }
    )
    return env


def job_command(config_path: Path, only_vae: bool = False) -> list[str]:
    cmd = [
        str(BIN / "dagster"),
        "job",
        "execute",
        "-m",
        "pipeline.definitions",
        "-j",
        "ldm_training_job",
        "-c",
        str(config_path),
    ]
    return cmd + (["-o", "*vae_model"] if only_vae else [])


def wait_for_job(
    cond: Callable[[], Any], proc: subprocess.Popen, what: str, log_path: Path, timeout: float, poll: float = 0.02
) -> None:
    """Poll ``cond`` until it holds; fail naming ``what`` (with the job's log tail) if the job ends or time runs out."""
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(
                f"the job ended (rc {proc.returncode}) before {what}:\n{log_path.read_text(errors='replace')[-3000:]}"
            )
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"no {what} within {timeout:.0f}s")
        time.sleep(poll)


def committed_steps(home: Path, stage: str) -> list[int]:
    """Steps with a commit record (.sha256) in any checkpoint directory of ``stage`` ("vae", "ldm")."""
    return sorted(
        int(m.group(1))
        for p in (home / "storage" / "checkpoints" / stage).glob("*/step-*.sha256")
        if (m := re.match(r"step-(\d+)\.sha256", p.name))
    )


def registered_versions(home: Path, name: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{home / 'mlflow.db'}"
    if not (home / "mlflow.db").exists():
        return []
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return list(client.search_model_versions(f"name = '{name}'"))


def dagster_run_ids(home: Path) -> list[str]:
    """The Dagster runs of this home, oldest first."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        return [r.run_id for r in reversed(instance.get_runs())]


def mlflow_statuses(home: Path, dagster_run_id: str | None = None) -> dict[str, str]:
    """{"parent" or asset key: status} of the MLflow runs of one Dagster run; with no run id, {MLflow run id:
    status} of every run in the experiment."""
    from mlflow.tracking import MlflowClient

    from pipeline.resources import PARENT_TAG

    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("ldm-pipeline")
    if dagster_run_id is None:
        return {r.info.run_id: r.info.status for r in client.search_runs([exp.experiment_id])}
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`dagster.run_id` = '{dagster_run_id}'")
    return {
        ("parent" if r.data.tags.get(PARENT_TAG) == "true" else r.data.tags["dagster.asset_key"]): r.info.status
        for r in runs
    }


def asset_metadata(home: Path, asset: str) -> dict[str, Any]:
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        ev = instance.get_latest_materialization_event(dg.AssetKey(asset))
        assert ev is not None, f"{asset} was never materialized"
        return {k: getattr(v, "value", v) for k, v in ev.asset_materialization.metadata.items()}


def _one_thread(fn):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the `dagster` process uses (OMP_NUM_THREADS=1 in `home_env`)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def reference_vae_weights(config: dict[str, Any], dataset_url: str) -> dict[str, Any]:
    """Train the vae_model's config uninterrupted, in this process, exactly as the asset builds it."""
    from ldm_core.data import ImageShardDataset
    from ldm_core.trainers.autoencoder import AutoencoderTrainingConfig, train_autoencoder
    from pipeline.config_bridge import to_core
    from pipeline.resources import ComputeResource

    section = config["ops"]["vae_model"]["config"]
    training = to_core(AutoencoderTrainingConfig, section["training"], "vae_model.training")
    training = training.model_copy(update={"trainer": ComputeResource().apply(training.trainer)})
    data = ImageShardDataset(dataset_url, split="train", resolution=section.get("resolution", 32), cache_decoded=True)
    result = _one_thread(lambda: train_autoencoder(training, data, checkpoint_dir=None))
    return {k: v.clone() for k, v in result.model.state_dict().items()}


def reference_ldm_weights(config: dict[str, Any], store_md: dict[str, Any]) -> dict[str, Any]:
    """Train the ldm_model's config uninterrupted on the same latent store, in this process, as the asset does."""
    from ldm_core.data.latent_store.reader import LatentStore
    from ldm_core.trainers.ldm import LDMTrainingConfig, train_ldm
    from pipeline.config_bridge import to_core
    from pipeline.defs.ldm_model.config import LdmModelConfig, complete_ldm_training
    from pipeline.distributed.specs import ldm_training_data
    from pipeline.resources import ComputeResource

    pooled_dim = LatentStore(store_md["store_url"]).metadata.pooled_dim
    section = LdmModelConfig.model_validate(config["ops"]["ldm_model"]["config"]).training.model_dump()
    section = complete_ldm_training(
        section,
        latent_channels=int(store_md["latent_shape"][0]),
        context_dim=int(store_md["context_dim"]),
        pooled_dim=pooled_dim,
    )
    training = to_core(LDMTrainingConfig, section, "ldm_model.training")
    training = training.model_copy(update={"trainer": ComputeResource().apply(training.trainer)})
    data = ldm_training_data(store_md["store_url"], training.trainer)
    result = _one_thread(lambda: train_ldm(training, data, uncond=data.uncond(), checkpoint_dir=None))
    return {k: v.clone() for k, v in result.model.state_dict().items()}


def dagster_kill_trial(
    workdir: Path,
    kill_at_step: int = 8,
    vae_steps: int = 24,
    only_vae: bool = False,
    asset: str = "vae_model",
    ldm_steps: int = 40,
    timeout: float = 420.0,
) -> dict[str, Any]:
    """``only_vae``: run the op selection ``*vae_model`` (image_dataset, vae_model) instead of the whole job: the
    same kill and resume, without the downstream assets' time (the test suite's variant)."""
    import torch

    from ldm_core.model_io import load_state_dict

    stage = STAGE[asset]
    home = fresh_home(workdir / "home")
    config = kill_config(vae_steps, only_vae, ldm_steps if asset == "ldm_model" else None)
    config_path = workdir / "kill.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = home_env(home)
    out: dict[str, Any] = {"asset": asset, "kill_at_step": kill_at_step, "only_vae": only_vae}
    t0 = time.monotonic()

    # 1) the run that is killed mid-training
    with open(workdir / "killed.log", "wb") as log:
        proc = subprocess.Popen(
            job_command(config_path, only_vae),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_job(
                lambda: max(committed_steps(home, stage), default=-1) >= kill_at_step,
                proc,
                f"{asset} reached step {kill_at_step}",
                workdir / "killed.log",
                timeout - (time.monotonic() - t0),
                poll=0.05,
            )
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out["killed_after_step"] = committed_steps(home, stage)[-1]
    (out["killed_run_id"],) = dagster_run_ids(home)
    out["registered_after_kill"] = len(registered_versions(home, REGISTERED[asset]))
    if asset == "ldm_model":
        out["vae_uri_before"] = asset_metadata(home, "vae_model")["vae_uri"]

    # 2) the same command again, to the end
    rerun = subprocess.run(
        job_command(config_path, only_vae), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    out["rerun_success"] = rerun.returncode == 0 and "RUN_SUCCESS" in rerun.stdout + rerun.stderr
    out["rerun_id"] = dagster_run_ids(home)[-1]
    if not out["rerun_success"]:
        out["log_tail"] = (rerun.stdout + rerun.stderr)[-3000:]
        return out
    md = asset_metadata(home, asset)
    out["resumed_from"] = md["resumed_from"]
    out["steps"] = md["steps"]

    # 3) the registered weights equal an uninterrupted training, bit for bit
    if asset == "vae_model":
        dataset_url = str(
            home / "storage" / "datasets" / config["ops"]["image_dataset"]["config"].get("name", "default")
        )
        got, ref = load_state_dict(md["vae_url"]), reference_vae_weights(config, dataset_url)
    else:
        vae_md, store_md = asset_metadata(home, "vae_model"), asset_metadata(home, "latent_store")
        out["vae_reused"] = vae_md.get("reused") is True and vae_md["vae_uri"] == out["vae_uri_before"]
        out["store_rows_new"] = store_md["rows_new"]
        got, ref = load_state_dict(f"{md['ldm_url']}/denoiser"), reference_ldm_weights(config, store_md)
    out["weights_equal"] = got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    versions = registered_versions(home, REGISTERED[asset])
    out["registered_versions"] = len(versions)
    complete = "config.json" if asset == "vae_model" else "bundle.json"
    out["registry_points_at_complete_model"] = all((Path(v.tags["storage_url"]) / complete).exists() for v in versions)
    out["seconds"] = time.monotonic() - t0
    return out
