"""Kill anywhere, rerun the same command, get the uninterrupted result: the trainers bit for bit, the latent store
and the canonical dataset row for row. The fault script (`python -m benchmarks.faults`) runs the same trials ten
times per job at random moments; here one trial per job, killed in the middle of its working window."""

import dagster as dg
import pytest

from benchmarks.faults import campaign
from benchmarks.faults.dagster_trial import dagster_kill_trial, mlflow_statuses


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("kills")


@pytest.fixture(scope="module")
def shared(root):
    return campaign.prepare_inputs(root, images=48)


@pytest.fixture(scope="module")
def reference(root, shared):
    """The uninterrupted run of a job (once per module)."""
    cache: dict[str, campaign.Reference] = {}

    def get(job: str) -> campaign.Reference:
        if job not in cache:
            cache[job] = campaign.reference_run(job, root, shared)
        return cache[job]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("job", campaign.JOBS)
def test_a_killed_job_resumes_to_the_uninterrupted_result(job, root, shared, reference):
    ref = reference(job)
    # killed once at half of the reference's working window, i.e. while it still works
    trial = campaign.kill_trial(ref, 0, root, shared, fractions=[0.5])
    assert trial.faults == 1, f"the kill did not hit a running job: {trial.kills}"
    assert trial.equal, trial.detail
    if job in ("ae", "ldm"):
        # the finishing run picked up a committed checkpoint unless the kill came before the first one
        assert trial.resumed_from is None or 0 < trial.resumed_from <= 12
    # a kill mid-write may leave a temp file; it is never read, and the finishing run must not have left any
    assert trial.stale_temp_files == 0, campaign.stale_temp_files(root / job / "trial-000")


def test_comparisons_detect_a_differing_result(root, reference):
    """The comparisons can fail: a trainer run of other length, and a store with a row dropped, are told apart."""
    import shutil

    from ldm_core import storage
    from ldm_core.data.latent_store import schema

    ref = reference("ae")
    short = root / "ae" / "short"
    run = campaign.run_job(campaign.runner_command("ae", short, {}) + ["--steps", "11"])
    assert run.returncode == 0
    equal, detail = campaign.compare_trainer(ref.workdir, short)
    assert not equal and "step 11" in detail

    enc = reference("encode")
    damaged = root / "encode" / "damaged-store"
    shutil.copytree(enc.inputs["store"], damaged)
    meta = schema.read_metadata(str(damaged))
    dropped = meta.shards.pop()
    meta.rows -= dropped.rows
    storage.write_text_atomic(schema.metadata_url(str(damaged)), meta.model_dump_json())
    equal, detail = campaign.compare_store(enc.inputs["store"], str(damaged), expected_rows=48)
    assert not equal and "missing" in detail


@pytest.mark.slow
def test_a_killed_dagster_materialization_resumes_from_its_checkpoint(tmp_path):
    """`dagster job execute` killed during vae_model training; the rerun resumes (resumed_from > 0) and registers
    an autoencoder equal to an uninterrupted training. (Op selection *vae_model to spare the downstream assets'
    time; the fault script runs the whole ldm_training_job, killed in vae_model and in ldm_model.)"""
    import subprocess

    from benchmarks.faults.dagster_trial import ROOT, asset_metadata, home_env, job_command, registered_versions

    out = dagster_kill_trial(tmp_path, kill_at_step=4, vae_steps=10, only_vae=True)
    assert out["registered_after_kill"] == 0, "the registry points at a model whose training was killed"
    assert out["rerun_success"], out.get("log_tail")
    assert out["resumed_from"] >= 4 and out["steps"] == 10
    assert out["weights_equal"]
    assert out["registered_versions"] == 1 and out["registry_points_at_complete_model"]
    # MLflow: the killed run's process could not end its runs; Dagster's record of its end does
    home = tmp_path / "home"
    _end_the_killed_run_as_dagster_does(home)
    assert "RUNNING" not in mlflow_statuses(home).values()
    assert mlflow_statuses(home, out["killed_run_id"]) == {
        "parent": "KILLED",
        "image_dataset": "FINISHED",
        "vae_model": "KILLED",
    }
    assert mlflow_statuses(home, out["rerun_id"]) == {
        "parent": "FINISHED",
        "image_dataset": "FINISHED",
        "vae_model": "FINISHED",
    }

    # once more: the same data and config give back the registered autoencoder (what lets a job killed further
    # down, in latent_store or ldm_model, carry on there instead of re-encoding and retraining from scratch)
    before = asset_metadata(home, "vae_model")
    again = subprocess.run(
        job_command(tmp_path / "kill.yaml", only_vae=True),
        cwd=ROOT,
        env=home_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    after = asset_metadata(home, "vae_model")
    assert after["reused"] is True and after["vae_uri"] == before["vae_uri"]
    assert len(registered_versions(home, "ldm-vae")) == 1


def _end_the_killed_run_as_dagster_does(home):
    """What follows a run worker's death in a deployment: Dagster marks the run failed (run monitoring, or the code
    server that launched it) and the daemon hands the failure to the run-failure sensor, evaluated here on the same
    instance and MLflow store from a cursor taken before the failure."""
    from pipeline.defs.mlflow_runs import mlflow_runs_end_on_failure
    from pipeline.resources import MLflowResource

    resources = {"mlflow": MLflowResource(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")}
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        (killed,) = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        first = mlflow_runs_end_on_failure.evaluate_tick(
            dg.build_sensor_context(instance=instance, resources=resources)
        )  # sets the cursor
        instance.report_run_failed(killed)
        mlflow_runs_end_on_failure.evaluate_tick(
            dg.build_sensor_context(instance=instance, cursor=first.cursor, resources=resources)
        )


def test_a_resume_restores_the_whole_rng_state_even_in_a_fresh_process(tmp_path):
    """In process, each run as if it were a new process (the per-process CPU peak is measured again): everything a
    checkpoint holds, the global RNG included, equals an uninterrupted run's. (The matmul-peak measurement used to
    draw its operands from the global RNG at the first log after every start.)"""
    import torch

    import ldm_core.trainers.meters as meters
    from benchmarks.faults import runner
    from ldm_core.checkpoint import CheckpointManager, flatten_state
    from ldm_core.flops import measure_matmul_peak
    from ldm_core.trainers.autoencoder import train_autoencoder

    state = torch.get_rng_state()
    measure_matmul_peak(n=64, seconds=0.0)
    assert torch.equal(torch.get_rng_state(), state), "measuring the peak drew from the global RNG"

    def run(d, stop=None):
        meters._PEAKS.clear()  # what a new process starts with
        return train_autoencoder(
            runner.ae_config(6),
            runner.ae_data(),
            checkpoint_dir=str(d),
            perceptual=None,
            should_stop=(lambda s: s == stop) if stop else None,
        )

    run(tmp_path / "a")
    run(tmp_path / "b", stop=3)
    assert run(tmp_path / "b").resumed_from == 3
    (ta, sa), (tb, sb) = (flatten_state(CheckpointManager(str(tmp_path / d)).load(6)) for d in ("a", "b"))
    assert sa == sb
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
