"""The whole pipeline materialized for real: a Dagster instance on disk, MLflow on SQLite, files under LDM_HOME."""

import json
import subprocess
import sys

import dagster as dg
import pytest
from mlflow.tracking import MlflowClient

from ldm_core.data.synthetic import write_shapes_source
from pipeline.definitions import defs
from tests.e2e.conftest import child_env


def _metadata(result, key):
    return {k: getattr(v, "value", v) for k, v in result.asset_materializations_for_node(key)[0].metadata.items()}


@pytest.fixture(scope="module")
def materialized(ldm_home, tiny_config):
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def("ldm_training_job").execute_in_process(run_config=tiny_config, instance=instance)
    assert result.success
    return result


def test_registry_has_both_models_with_aliases(materialized, ldm_home):
    client = MlflowClient()
    vae = client.get_model_version_by_alias("ldm-vae", "candidate")
    ldm = client.get_model_version_by_alias("ldm", "candidate")
    champion = client.get_model_version_by_alias("ldm", "champion")  # first model: the gate had no champion to beat
    assert champion.version == ldm.version
    assert _metadata(materialized, "vae_model")["vae_uri"] == f"models:/ldm-vae/{vae.version}"
    assert ldm.tags["vae_uri"] == f"models:/ldm-vae/{vae.version}"
    metrics = json.loads(champion.tags["evaluation_metrics"])
    assert metrics["psnr"]["computed"] and metrics["psnr"]["n"] > 0


def test_every_materialization_is_a_nested_mlflow_run(materialized):
    client = MlflowClient()
    exp = client.get_experiment_by_name("ldm-pipeline")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`dagster.run_id` = '{materialized.run_id}'")
    by_asset = {r.data.tags.get("dagster.asset_key"): r for r in runs}
    assert set(by_asset) >= {"image_dataset", "vae_model", "latent_store", "ldm_model", "evaluation_report"}
    parents = {r.data.tags.get("mlflow.parentRunId") for k, r in by_asset.items() if k}
    assert len(parents) == 1 and None not in parents
    vae_run = by_asset["vae_model"]
    assert vae_run.data.params["trainer.steps"] == "6" and "rec" in vae_run.data.metrics
    assert "loss" in by_asset["ldm_model"].data.metrics
    assert "psnr" in by_asset["evaluation_report"].data.metrics


def test_every_mlflow_run_of_a_successful_job_ends_finished(materialized):
    client = MlflowClient()
    exp = client.get_experiment_by_name("ldm-pipeline")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`dagster.run_id` = '{materialized.run_id}'")
    assert len(runs) == 6 and {r.info.status for r in runs} == {"FINISHED"}  # the parent and five materializations
    assert client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'") == []


def test_latent_store_records_the_vae_version_it_encoded_with(materialized):
    from ldm_core.data.latent_store import LatentStore

    store_md = _metadata(materialized, "latent_store")
    vae_md = _metadata(materialized, "vae_model")
    assert store_md["vae_uri"] == vae_md["vae_uri"]
    assert LatentStore(store_md["store_url"]).metadata.vae_identity == vae_md["vae_uri"]
    assert _metadata(materialized, "ldm_model")["store_url"] == store_md["store_url"]


def test_asset_checks_ran_and_passed(materialized):
    checks = {c.check_name: c.passed for c in materialized.get_asset_check_evaluations()}
    assert checks == {"image_dataset_quality": True, "vae_reconstruction_psnr": True,
                      "vae_reconstruction_fidelity": True, "latents_finite_and_scaled": True}


def test_report_exists_and_names_the_gate(materialized):
    md = _metadata(materialized, "evaluation_report")
    html = open(md["report_html"], encoding="utf-8").read()
    assert "data:image/png;base64," in html and "psnr" in html
    assert md["gate_passed"] is True and isinstance(md["psnr"], float)


def test_pyfunc_loads_in_a_fresh_process(materialized, ldm_home):
    code = (
        "import mlflow, numpy as np, pandas as pd\n"
        "m = mlflow.pyfunc.load_model('models:/ldm@champion')\n"
        "out = np.asarray(m.predict(pd.DataFrame({'prompt': ['a large red circle in the center', 'a small blue square'], 'seed': [1, 2], 'steps': [2, 2]})))\n"
        "print(out.shape, out.dtype)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(ldm_home), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(2, 32, 32, 3) uint8" in out.stdout


def test_new_data_encodes_only_new_shards(materialized, ldm_home, tiny_config, tmp_path):
    """A user folder source: the second run ingests the added images into a new shard and encodes only that."""
    source = tmp_path / "src"
    write_shapes_source(str(source), 20, seed=5)
    cfg = json.loads(json.dumps(tiny_config))
    cfg["ops"]["image_dataset"]["config"].update({"source": str(source), "name": "user", "photo_crops": 0})
    cfg["ops"]["image_dataset"]["config"]["ingest"]["rows_per_shard"] = 16
    retrain = {"ops": {k: v for k, v in cfg["ops"].items() if k in ("image_dataset", "latent_store")}}
    job = defs.resolve_job_def("ldm_retrain_job").get_subset(asset_selection={dg.AssetKey("image_dataset"), dg.AssetKey("latent_store")})
    with dg.DagsterInstance.get() as instance:
        first = job.execute_in_process(run_config=retrain, instance=instance)
        s1 = _metadata(first, "latent_store")
        write_shapes_source(str(tmp_path / "more"), 12, seed=6)
        for f in (tmp_path / "more").glob("*.png"):
            (source / f"new-{f.name}").write_bytes(f.read_bytes())
        lines = [json.loads(x) for x in (tmp_path / "more" / "metadata.jsonl").read_text().splitlines()]
        with open(source / "metadata.jsonl", "a", encoding="utf-8") as fh:
            for row in lines:
                fh.write(json.dumps({**row, "file_name": f"new-{row['file_name']}"}) + "\n")
        second = job.execute_in_process(run_config=retrain, instance=instance)
    d2, s2 = _metadata(second, "image_dataset"), _metadata(second, "latent_store")
    assert d2["rows_new"] == 12 and d2["new_shards"] == 1
    assert s2["store_url"] == s1["store_url"]  # same VAE, same store
    assert s2["rows_new"] == 12 and s2["shards_new"] == 1 and s2["rows_total"] == s1["rows_total"] + 12
