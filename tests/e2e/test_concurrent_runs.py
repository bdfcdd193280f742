"""Two runs of the whole job at once on one Dagster instance and one storage root, each on its own dataset: every
asset and every check of a run reads what its own run materialized, never the other run's.

The overlap is made deterministic rather than left to the scheduler. Run B trails run A by one asset: B starts once
A's image_dataset is materialized, and each of B's steps starts (reads its upstream) only once A has materialized that
step's asset. Each upstream read of A, in an asset or a check, waits until B has materialized that upstream asset too.
So whenever A reads an upstream asset, the latest materialization of it is B's: a step that read "the latest" would
train, check and evaluate B's artifacts in run A. The pacing wraps the `read_upstream` of every asset module and of
every checks module and calls it unchanged: it moves time, not results.
"""

import copy
import threading
import time

import dagster as dg
import pytest

import pipeline.defs.evaluation_report.asset
import pipeline.defs.image_dataset.checks
import pipeline.defs.latent_store.asset
import pipeline.defs.latent_store.checks
import pipeline.defs.ldm_model.asset
import pipeline.defs.vae_model.asset
import pipeline.defs.vae_model.checks
from pipeline.definitions import defs
from tests.common import metadata_values

READERS = (
    pipeline.defs.vae_model.asset,
    pipeline.defs.vae_model.checks,
    pipeline.defs.image_dataset.checks,
    pipeline.defs.latent_store.asset,
    pipeline.defs.latent_store.checks,
    pipeline.defs.ldm_model.asset,
    pipeline.defs.evaluation_report.asset,
)
WAIT_SECONDS = 600  # the other run's next asset on 2 busy cores, with room to spare


def _config(tiny_config: dict, name: str, seed: int, count: int) -> dict:
    """The tiny run on a dataset of its own: its name, its images and how many (so that its counts tell it apart)."""
    config = copy.deepcopy(tiny_config)
    config["ops"]["image_dataset"]["config"].update(name=name, builtin_seed=seed, builtin_count=count)
    return config


def _materializations(instance: dg.DagsterInstance, run_id: str) -> dict[str, dict]:
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    return {r.asset_key.to_user_string(): metadata_values(r.asset_materialization.metadata) for r in records}


def _checks(instance: dg.DagsterInstance, run_id: str) -> dict[str, dict]:
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    out = {}
    for r in records:
        evaluation = r.event_log_entry.dagster_event.event_specific_data
        out[evaluation.check_name] = metadata_values(evaluation.metadata)
    return out


class Pacer:
    """Holds each run's upstream reads until the other run has got as far as the module's docstring says."""

    def __init__(self, instance: dg.DagsterInstance):
        self.instance = instance
        self.run_ids: dict[str, str] = {}

    def materialized(self, which: str, key: str) -> bool:
        run_id = self.run_ids.get(which)
        if run_id is None:
            return False
        records = self.instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
        return any(r.asset_key == dg.AssetKey(key) for r in records)

    def wait(self, which: str, key: str) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not self.materialized(which, key):
            assert time.monotonic() < deadline, f"run {which} never materialized {key}"
            time.sleep(0.1)

    def wrap(self, read):
        def paced(context, record):
            key = record.asset
            which = "a" if context.run.run_config["ops"]["image_dataset"]["config"]["name"] == "set-a" else "b"
            self.run_ids.setdefault(which, context.run.run_id)
            if which == "a":
                self.wait("b", key)  # B's materialization of it is the latest when A reads it
            elif isinstance(context, dg.AssetExecutionContext):
                self.wait("a", context.asset_key.to_user_string())  # B's step comes after A's
            return read(context, record)

        return paced


@pytest.fixture(scope="module")
def two_runs(ldm_home, tiny_config):
    """(instance, {"a": run A's id, "b": run B's id}) of two whole-job runs paced as the module's docstring says."""
    configs = {"a": _config(tiny_config, "set-a", 1, 48), "b": _config(tiny_config, "set-b", 2, 40)}
    job = defs.resolve_job_def("ldm_training_job")
    results: dict[str, dg.ExecuteInProcessResult] = {}
    with pytest.MonkeyPatch.context() as mp, dg.DagsterInstance.get() as instance:
        pacer = Pacer(instance)
        for module in READERS:
            mp.setattr(module, "read_upstream", pacer.wrap(module.read_upstream))

        def run(which: str) -> None:
            results[which] = job.execute_in_process(run_config=configs[which], instance=instance, raise_on_error=False)

        threads = {w: threading.Thread(target=run, args=(w,), name=f"run-{w}") for w in ("a", "b")}
        threads["a"].start()
        pacer.wait("a", "image_dataset")  # B's image_dataset after A's (A's first read waits for it)
        threads["b"].start()
        for t in threads.values():
            t.join(2 * WAIT_SECONDS)
        assert results["a"].success and results["b"].success
        yield instance, {which: r.run_id for which, r in results.items()}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["a", "b"])
def test_each_run_trains_and_evaluates_its_own_artifacts(two_runs, which):
    instance, run_ids = two_runs
    run_id = run_ids[which]
    md = _materializations(instance, run_id)
    ds, vae, store, ldm, report = (
        md[k] for k in ("image_dataset", "vae_model", "latent_store", "ldm_model", "evaluation_report")
    )
    assert ds["dataset_url"].endswith(f"set-{which}")
    # the artifacts each asset used are its run's: the URLs and versions its upstream materializations recorded
    assert vae["dataset_version"] == ds["dataset_version"]
    assert store["vae_uri"] == vae["vae_uri"] and store["vae_url"] == vae["vae_url"]
    assert ldm["store_url"] == store["store_url"] and ldm["vae_uri"] == vae["vae_uri"]
    assert report["ldm_uri"] == ldm["ldm_uri"]
    # and each names the run its upstream came from: this one
    for asset, upstream in (
        ("vae_model", ["image_dataset"]),
        ("latent_store", ["image_dataset", "vae_model"]),
        ("ldm_model", ["latent_store"]),
        ("evaluation_report", ["ldm_model", "image_dataset", "vae_model"]),
    ):
        for key in upstream:
            assert md[asset][f"upstream.{key}.run_id"] == run_id, (asset, key)
            assert md[asset][f"upstream.{key}.source"] == "this run", (asset, key)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["a", "b"])
def test_each_runs_checks_check_its_own_materializations(two_runs, which):
    instance, run_ids = two_runs
    run_id = run_ids[which]
    md, checks = _materializations(instance, run_id), _checks(instance, run_id)
    assert set(checks) == {
        "image_dataset_quality",
        "vae_reconstruction_psnr",
        "vae_reconstruction_fidelity",
        "latents_finite_and_scaled",
        "promotion_gate",
    }
    # what each check measured is its run's materialization
    assert checks["image_dataset_quality"]["rows_total"] == md["image_dataset"]["rows_total"]
    assert checks["vae_reconstruction_psnr"]["val_psnr"] == md["vae_model"]["val_psnr"]
    fidelity = checks["vae_reconstruction_fidelity"]["worst_decile_psnr"]
    assert fidelity == md["vae_model"]["fidelity"]["worst_decile_psnr"]
    assert checks["latents_finite_and_scaled"]["rows_checked"] == md["latent_store"]["rows_total"]
    assert checks["promotion_gate"]["candidate"] == md["ldm_model"]["ldm_uri"]  # the gate judged this run's model
    # and each names the run its materialization came from: this one
    for name, key in (
        ("image_dataset_quality", "image_dataset"),
        ("vae_reconstruction_psnr", "vae_model"),
        ("vae_reconstruction_fidelity", "vae_model"),
        ("latents_finite_and_scaled", "latent_store"),
    ):
        assert checks[name][f"upstream.{key}.run_id"] == run_id and checks[name][f"upstream.{key}.source"] == "this run"


@pytest.mark.slow
def test_the_runs_overlapped_so_that_a_read_the_latest_of_b(two_runs):
    """The premise of the tests above: the artifacts differ between the runs (reading B's in A would show), and each
    asset's latest materialization when run A's next step read it was B's."""
    instance, run_ids = two_runs
    a, b = (_materializations(instance, run_ids[w]) for w in ("a", "b"))
    assert a["image_dataset"]["dataset_version"] != b["image_dataset"]["dataset_version"]
    assert a["image_dataset"]["rows_total"] != b["image_dataset"]["rows_total"]
    assert a["latent_store"]["rows_total"] != b["latent_store"]["rows_total"]
    assert a["vae_model"]["val_psnr"] != b["vae_model"]["val_psnr"]
    for key, field in (("vae_model", "vae_uri"), ("latent_store", "store_url"), ("ldm_model", "ldm_uri")):
        assert a[key][field] != b[key][field]
    ids = {}
    for key in ("image_dataset", "vae_model", "latent_store", "ldm_model", "evaluation_report"):
        for r in instance.fetch_materializations(dg.AssetKey(key), limit=10).records:
            ids[(r.run_id, key)] = r.storage_id
    chain = ["image_dataset", "vae_model", "latent_store", "ldm_model", "evaluation_report"]
    for upstream, step in zip(chain, chain[1:], strict=False):
        # A's upstream, then B's, then A's step that read it
        assert ids[(run_ids["a"], upstream)] < ids[(run_ids["b"], upstream)] < ids[(run_ids["a"], step)]
