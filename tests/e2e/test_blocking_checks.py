"""Each asset check can fail, and the blocking ones stop everything downstream of their asset in the same run.

The tiny config keeps every bound lenient (6 training steps learn nothing): here each test sets one bound that the
tiny run cannot meet and runs the chain up to the asset after the checked one.
"""

import copy

import pytest

from tests.e2e.helpers import check_results, execute, materialized_assets, upto


@pytest.fixture
def config(tiny_config) -> dict:
    return copy.deepcopy(tiny_config)


@pytest.mark.slow
def test_a_psnr_below_the_floor_blocks_the_latent_store(ldm_home, config):
    config["ops"]["vae_model"]["config"]["psnr_floor"] = 99.0
    result = execute(config, upto("latent_store"), raise_on_error=False)
    assert check_results(result)["vae_reconstruction_psnr"] is False
    assert "vae_model" in materialized_assets(result) and "latent_store" not in materialized_assets(result)
    assert not result.success


@pytest.mark.slow
def test_a_lost_colour_blocks_the_latent_store(ldm_home, config):
    # after 6 steps the reconstructions show no colour yet: every colour class fails
    config["ops"]["vae_model"]["config"]["fidelity"]["min_class_accuracy"] = 0.9
    result = execute(config, upto("latent_store"), raise_on_error=False)
    checks = check_results(result)
    assert checks["vae_reconstruction_fidelity"] is False and checks["vae_reconstruction_psnr"] is True
    evaluation = next(e for e in result.get_asset_check_evaluations() if e.check_name == "vae_reconstruction_fidelity")
    assert "reconstructed as" in evaluation.description
    assert "vae_model" in materialized_assets(result) and "latent_store" not in materialized_assets(result)


@pytest.mark.slow
def test_latents_off_unit_scale_block_the_ldm(ldm_home, config):
    config["ops"]["latent_store"]["config"]["check_std_tolerance"] = 1e-9
    result = execute(config, upto("ldm_model"), raise_on_error=False)
    assert check_results(result)["latents_finite_and_scaled"] is False
    assert "latent_store" in materialized_assets(result) and "ldm_model" not in materialized_assets(result)
