"""Each asset check can fail, and the blocking ones stop everything downstream of their asset in the same run.

The tiny config keeps every bound lenient (6 training steps learn nothing): here each test sets one bound that the
tiny run cannot meet and runs the chain up to the asset after the checked one.
"""

import copy

import dagster as dg
import pytest

from pipeline.definitions import defs

CHAIN = ("image_dataset", "vae_model", "latent_store", "ldm_model")


def _run(config: dict, upto: str) -> dg.ExecuteInProcessResult:
    selection = {dg.AssetKey(k) for k in CHAIN[: CHAIN.index(upto) + 1]}
    job = defs.resolve_job_def("ldm_training_job").get_subset(asset_selection=selection)
    ops = {k: v for k, v in config["ops"].items() if dg.AssetKey(k) in selection}
    with dg.DagsterInstance.get() as instance:
        return job.execute_in_process(run_config={"ops": ops}, instance=instance, raise_on_error=False)


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def _materialized(result: dg.ExecuteInProcessResult) -> set[str]:
    return {
        e.event_specific_data.materialization.asset_key.to_user_string()
        for e in result.get_asset_materialization_events()
    }


@pytest.fixture
def config(tiny_config) -> dict:
    return copy.deepcopy(tiny_config)


@pytest.mark.slow
def test_a_psnr_below_the_floor_blocks_the_latent_store(ldm_home, config):
    config["ops"]["vae_model"]["config"]["psnr_floor"] = 99.0
    result = _run(config, "latent_store")
    assert _checks(result)["vae_reconstruction_psnr"] is False
    assert "vae_model" in _materialized(result) and "latent_store" not in _materialized(result)
    assert not result.success


@pytest.mark.slow
def test_a_lost_colour_blocks_the_latent_store(ldm_home, config):
    # after 6 steps the reconstructions show no colour yet: every colour class fails
    config["ops"]["vae_model"]["config"]["fidelity"]["min_class_accuracy"] = 0.9
    result = _run(config, "latent_store")
    checks = _checks(result)
    assert checks["vae_reconstruction_fidelity"] is False and checks["vae_reconstruction_psnr"] is True
    evaluation = next(e for e in result.get_asset_check_evaluations() if e.check_name == "vae_reconstruction_fidelity")
    assert "reconstructed as" in evaluation.description
    assert "vae_model" in _materialized(result) and "latent_store" not in _materialized(result)


@pytest.mark.slow
def test_latents_off_unit_scale_block_the_ldm(ldm_home, config):
    config["ops"]["latent_store"]["config"]["check_std_tolerance"] = 1e-9
    result = _run(config, "ldm_model")
    assert _checks(result)["latents_finite_and_scaled"] is False
    assert "latent_store" in _materialized(result) and "ldm_model" not in _materialized(result)
