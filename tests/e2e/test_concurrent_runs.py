"""Two runs of the whole job at once on one Dagster instance and one storage root, each on its own dataset: every
asset and every check of a run reads what its own run materialized, never the other run's.

The overlap is made deterministic rather than left to the scheduler: run A is held at its first upstream read (its
vae_model reading image_dataset) until run B has finished the whole job, so that from then on every upstream asset's
latest materialization is B's. A step that read "the latest" would train, check and evaluate B's artifacts in run A.
The hold wraps the assets' `read_upstream` and calls it unchanged: it moves time, not results.
"""

import copy
import threading

import dagster as dg
import pytest

import pipeline.assets.vae_model as vae_model_module
from pipeline.definitions import defs

HOLD_SECONDS = 600  # run B's whole job on 2 busy cores, with room to spare


def _config(tiny_config: dict, name: str, seed: int) -> dict:
    config = copy.deepcopy(tiny_config)
    config["ops"]["image_dataset"]["config"].update(name=name, builtin_seed=seed)
    return config


def _values(metadata: dict) -> dict:
    return {k: getattr(v, "value", v) for k, v in metadata.items()}


def _materializations(instance: dg.DagsterInstance, run_id: str) -> dict[str, dict]:
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    return {r.asset_key.to_user_string(): _values(r.asset_materialization.metadata)
            for r in records}


def _checks(instance: dg.DagsterInstance, run_id: str) -> dict[str, dict]:
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    out = {}
    for r in records:
        evaluation = r.event_log_entry.dagster_event.event_specific_data
        out[evaluation.check_name] = _values(evaluation.metadata)
    return out


@pytest.fixture(scope="module")
def two_runs(ldm_home, tiny_config):
    """(instance, {"a": run A's id, "b": run B's id}): A started first and held, B run start to finish meanwhile."""
    configs = {"a": _config(tiny_config, "set-a", 1), "b": _config(tiny_config, "set-b", 2)}
    b_done, a_held = threading.Event(), threading.Event()
    real_read = vae_model_module.read_upstream

    def hold_run_a(context, key):
        if context.run.run_config["ops"]["image_dataset"]["config"]["name"] == "set-a" and not a_held.is_set():
            a_held.set()
            assert b_done.wait(HOLD_SECONDS), "run B did not finish"
        return real_read(context, key)

    job = defs.resolve_job_def("ldm_training_job")
    results: dict[str, dg.ExecuteInProcessResult] = {}
    with pytest.MonkeyPatch.context() as mp, dg.DagsterInstance.get() as instance:
        mp.setattr(vae_model_module, "read_upstream", hold_run_a)

        def run(which: str) -> None:
            try:
                results[which] = job.execute_in_process(run_config=configs[which], instance=instance,
                                                        raise_on_error=False)
            finally:
                if which == "b":
                    b_done.set()

        thread_a = threading.Thread(target=run, args=("a",))
        thread_a.start()
        assert a_held.wait(HOLD_SECONDS), "run A never reached its first upstream read"
        run("b")  # while A is held between its image_dataset and its vae_model
        thread_a.join(HOLD_SECONDS)
        assert not thread_a.is_alive()
        assert results["a"].success and results["b"].success
        yield instance, {which: r.run_id for which, r in results.items()}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["a", "b"])
def test_each_run_trains_and_evaluates_its_own_artifacts(two_runs, which):
    instance, run_ids = two_runs
    run_id = run_ids[which]
    md = _materializations(instance, run_id)
    ds, vae, store, ldm, report = (md[k] for k in ("image_dataset", "vae_model", "latent_store", "ldm_model",
                                                    "evaluation_report"))
    assert ds["dataset_url"].endswith(f"set-{which}")
    # the artifacts each asset used are its run's: the URLs and versions its upstream materializations recorded
    assert vae["dataset_version"] == ds["dataset_version"]
    assert store["vae_uri"] == vae["vae_uri"] and store["vae_url"] == vae["vae_url"]
    assert ldm["store_url"] == store["store_url"] and ldm["vae_uri"] == vae["vae_uri"]
    assert report["ldm_uri"] == ldm["ldm_uri"]
    # and each names the run its upstream came from: this one
    for asset, upstream in (("vae_model", ["image_dataset"]), ("latent_store", ["image_dataset", "vae_model"]),
                            ("ldm_model", ["latent_store"]),
                            ("evaluation_report", ["ldm_model", "image_dataset", "vae_model"])):
        for key in upstream:
            assert md[asset][f"upstream.{key}.run_id"] == run_id, (asset, key)
            assert md[asset][f"upstream.{key}.source"] == "this run", (asset, key)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["a", "b"])
def test_each_runs_checks_check_its_own_materializations(two_runs, which):
    instance, run_ids = two_runs
    run_id = run_ids[which]
    md, checks = _materializations(instance, run_id), _checks(instance, run_id)
    assert set(checks) == {"image_dataset_quality", "vae_reconstruction_psnr", "vae_reconstruction_fidelity",
                           "latents_finite_and_scaled"}
    for name, key in (("image_dataset_quality", "image_dataset"), ("vae_reconstruction_psnr", "vae_model"),
                      ("vae_reconstruction_fidelity", "vae_model"), ("latents_finite_and_scaled", "latent_store")):
        assert checks[name][f"upstream.{key}.run_id"] == run_id and checks[name][f"upstream.{key}.source"] == "this run"
    assert checks["vae_reconstruction_psnr"]["val_psnr"] == md["vae_model"]["val_psnr"]
    assert checks["image_dataset_quality"]["rows_total"] == md["image_dataset"]["rows_total"]


@pytest.mark.slow
def test_the_runs_did_overlap_and_made_different_artifacts(two_runs):
    """The premise of the two tests above: B materialized everything after A's image_dataset and before A's models,
    and its artifacts differ from A's (so reading B's in A would show)."""
    instance, run_ids = two_runs
    a, b = (_materializations(instance, run_ids[w]) for w in ("a", "b"))
    for key in ("vae_uri", "vae_url"):
        assert a["vae_model"][key] != b["vae_model"][key]
    assert a["image_dataset"]["dataset_version"] != b["image_dataset"]["dataset_version"]
    assert a["latent_store"]["store_url"] != b["latent_store"]["store_url"]
    assert a["ldm_model"]["ldm_uri"] != b["ldm_model"]["ldm_uri"]
    order = {(r.run_id, r.asset_key.to_user_string()): r.storage_id for r in instance.fetch_materializations(
        dg.AssetKey("image_dataset"), limit=10).records}
    vae_a = instance.fetch_materializations(dg.AssetKey("vae_model"), limit=10).records
    a_vae_id = next(r.storage_id for r in vae_a if r.run_id == run_ids["a"])
    assert order[(run_ids["a"], "image_dataset")] < order[(run_ids["b"], "image_dataset")] < a_vae_id
