"""The whole pipeline materialized for real: a Dagster instance on disk, MLflow on SQLite, files under LDM_HOME."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ldm_core.data.synthetic import write_shapes_source
from tests.e2e.helpers import check_results, child_env, execute, materialized_metadata, mlflow_runs


@pytest.fixture(scope="module")
def materialized(ldm_home, tiny_config):
    result = execute(tiny_config)
    assert result.success
    return result


def test_registry_has_both_models_with_aliases(materialized, ldm_home):
    client = MlflowClient()
    vae = client.get_model_version_by_alias("ldm-vae", "candidate")
    ldm = client.get_model_version_by_alias("ldm", "candidate")
    champion = client.get_model_version_by_alias("ldm", "champion")  # first model: the gate had no champion to beat
    assert champion.version == ldm.version
    assert materialized_metadata(materialized, "vae_model")["vae_uri"] == f"models:/ldm-vae/{vae.version}"
    assert ldm.tags["vae_uri"] == f"models:/ldm-vae/{vae.version}"
    metrics = json.loads(champion.tags["evaluation_metrics"])
    assert metrics["psnr"]["computed"] and metrics["psnr"]["n"] > 0


def test_every_materialization_is_a_nested_mlflow_run(materialized):
    runs = mlflow_runs(materialized)
    by_asset = {r.data.tags.get("dagster.asset_key"): r for r in runs}
    assert set(by_asset) >= {"image_dataset", "vae_model", "latent_store", "ldm_model", "evaluation_report"}
    parents = {r.data.tags.get("mlflow.parentRunId") for k, r in by_asset.items() if k}
    assert len(parents) == 1 and None not in parents
    vae_run = by_asset["vae_model"]
    assert vae_run.data.params["trainer.steps"] == "6" and "rec" in vae_run.data.metrics
    assert "loss" in by_asset["ldm_model"].data.metrics
    assert "psnr" in by_asset["evaluation_report"].data.metrics


def test_training_runs_record_system_metrics_and_their_inputs(materialized):
    """The VAE's run logs the dataset version it trained on, the LDM's the latent store version, each with its digest,
    and both (and the encoding and evaluation runs) carry CPU and memory samples."""
    client = MlflowClient()
    exp = client.get_experiment_by_name("ldm-pipeline")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`dagster.run_id` = '{materialized.run_id}'")
    by_asset = {r.data.tags.get("dagster.asset_key"): r for r in runs}
    for asset in ("vae_model", "latent_store", "ldm_model", "evaluation_report"):
        metrics = by_asset[asset].data.metrics
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics), asset
    ds, store = (
        materialized_metadata(materialized, "image_dataset"),
        materialized_metadata(materialized, "latent_store"),
    )
    for asset, name, url, digest in (
        ("vae_model", "image_dataset", ds["dataset_url"], ds["dataset_version"]),
        ("ldm_model", "latent_store", store["store_url"], store["store_version"]),
    ):
        inputs = client.get_run(by_asset[asset].info.run_id).inputs.dataset_inputs
        [logged] = [i for i in inputs if i.dataset.name == name]
        assert logged.dataset.digest == digest and url in logged.dataset.source, (asset, logged.dataset)
        assert {t.key: t.value for t in logged.tags}.get("mlflow.data.context") == "training"


def test_every_mlflow_run_of_a_successful_job_ends_finished(materialized):
    client = MlflowClient()
    exp = client.get_experiment_by_name("ldm-pipeline")
    runs = mlflow_runs(materialized)
    assert len(runs) == 6 and {r.info.status for r in runs} == {"FINISHED"}  # the parent and five materializations
    assert client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'") == []


def test_latent_store_records_the_vae_version_it_encoded_with(materialized):
    from ldm_core.data.latent_store.reader import LatentStore

    store_md = materialized_metadata(materialized, "latent_store")
    vae_md = materialized_metadata(materialized, "vae_model")
    assert store_md["vae_uri"] == vae_md["vae_uri"]
    assert LatentStore(store_md["store_url"]).metadata.vae_identity == vae_md["vae_uri"]
    assert materialized_metadata(materialized, "ldm_model")["store_url"] == store_md["store_url"]


def test_asset_checks_ran_and_passed(materialized):
    assert check_results(materialized) == {
        "image_dataset_quality": True,
        "vae_reconstruction_psnr": True,
        "vae_reconstruction_fidelity": True,
        "latents_finite_and_scaled": True,
        "promotion_gate": True,  # the first model: no champion to beat, and the demo's thresholds hold
    }


def test_report_exists_and_names_the_gate(materialized):
    md = materialized_metadata(materialized, "evaluation_report")
    html = open(md["report_html"], encoding="utf-8").read()
    assert "data:image/png;base64," in html and "psnr" in html
    assert md["gate_passed"] is True and isinstance(md["psnr"], float)
    assert md["backbone"].startswith("unet, preset tiny (") and 'id="model"' in html


def test_pyfunc_loads_in_a_fresh_process(materialized, ldm_home):
    code = (
        "import mlflow, numpy as np, pandas as pd\n"
        "m = mlflow.pyfunc.load_model('models:/ldm@champion')\n"
        "prompts = ['a large red circle in the center', 'a small blue square']\n"
        "out = np.asarray(m.predict(pd.DataFrame({'prompt': prompts, 'seed': [1, 2], 'steps': [2, 2]})))\n"
        "print(out.shape, out.dtype)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(ldm_home), timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(2, 32, 32, 3) uint8" in out.stdout


def test_new_data_encodes_only_new_shards(materialized, ldm_home, tiny_config, tmp_path):
    """A user folder source: the second run ingests the added images into a new shard and encodes only that."""
    source = tmp_path / "src"
    write_shapes_source(str(source), 20, seed=5)
    cfg = json.loads(json.dumps(tiny_config))
    cfg["ops"]["image_dataset"]["config"].update({"source": str(source), "name": "user", "photo_crops": 0})
    cfg["ops"]["image_dataset"]["config"]["ingest"]["rows_per_shard"] = 16
    retrain = ("image_dataset", "latent_store")
    first = execute(cfg, retrain, job="ldm_retrain_job")
    s1 = materialized_metadata(first, "latent_store")
    write_shapes_source(str(tmp_path / "more"), 12, seed=6)
    for f in (tmp_path / "more").glob("*.png"):
        (source / f"new-{f.name}").write_bytes(f.read_bytes())
    lines = [json.loads(x) for x in (tmp_path / "more" / "metadata.jsonl").read_text().splitlines()]
    with open(source / "metadata.jsonl", "a", encoding="utf-8") as fh:
        for row in lines:
            fh.write(json.dumps({**row, "file_name": f"new-{row['file_name']}"}) + "\n")
    second = execute(cfg, retrain, job="ldm_retrain_job")
    d2, s2 = materialized_metadata(second, "image_dataset"), materialized_metadata(second, "latent_store")
    assert d2["rows_new"] == 12 and d2["new_shards"] == 1
    assert s2["store_url"] == s1["store_url"]  # same VAE, same store
    assert s2["rows_new"] == 12 and s2["shards_new"] == 1 and s2["rows_total"] == s1["rows_total"] + 12


# ---------------------------------------------------------------------------------------------------------------
# The MMDiT backbone through the same assets
# ---------------------------------------------------------------------------------------------------------------

MMDIT = {"kind": "mmdit", "preset": "tiny", "hidden_size": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def mmdit_materialized(materialized, tiny_config):
    """ldm_model and evaluation_report again, on the same latent store, with `denoiser: {kind: mmdit, …}`."""
    cfg = copy.deepcopy(tiny_config)
    cfg["ops"]["ldm_model"]["config"]["training"]["denoiser"] = MMDIT
    result = execute(cfg, ("ldm_model", "evaluation_report"))
    assert result.success
    return result


def test_mmdit_trains_registers_and_the_report_names_it(mmdit_materialized, ldm_home):
    ldm_md = materialized_metadata(mmdit_materialized, "ldm_model")
    assert ldm_md["backbone"].startswith("mmdit, preset tiny (hidden_size 32, depth 2, heads 2, patch_size 2): ")
    version = MlflowClient().get_model_version("ldm", str(ldm_md["ldm_version"]))
    assert version.tags["backbone"] == ldm_md["backbone"] and ldm_md["ldm_version"] >= 2  # after the UNet's
    md = materialized_metadata(mmdit_materialized, "evaluation_report")
    assert md["ldm_uri"] == ldm_md["ldm_uri"] and isinstance(md["gate_passed"], bool)  # the gate judged it
    document = json.loads(Path(md["metrics_json"]).read_text(encoding="utf-8"))
    assert document["model"]["kind"] == "mmdit" and document["model"]["preset"] == "tiny"
    assert document["model"]["parameters"] > 0 and document["metrics"]["color_acc"]["computed"]
    html = Path(md["report_html"]).read_text(encoding="utf-8")
    assert "mmdit, preset tiny (hidden_size 32, depth 2, heads 2, patch_size 2): " in html
    assert md["summary"].startswith("**Denoiser:** mmdit, preset tiny")
    # the registered pyfunc samples with it in a fresh process
    code = (
        "import mlflow, numpy as np, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model('{ldm_md['ldm_uri']}')\n"
        "out = np.asarray(m.predict(pd.DataFrame({'prompt': ['a large red circle in the center'], 'steps': [2]})))\n"
        "print(out.shape, out.dtype)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(ldm_home), timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(1, 32, 32, 3) uint8" in out.stdout
