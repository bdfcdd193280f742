"""The promotion gate never mistakes a registry it could not read, or a champion without metrics, for "no champion"
(which would promote on thresholds alone, past a better model).

The module trains the tiny pipeline once (v1, champion), then registers a second candidate (ldm_model again, v2) that
each test evaluates against the champion.
"""

import copy

import dagster as dg
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.promotion import METRICS_TAG
from tests.e2e.helpers import execute, materialized_metadata, step_events


@pytest.fixture(scope="module")
def candidate(ldm_home, tiny_config):
    """Champion v1 (the first model) and a newer candidate; returns the candidate's version."""
    assert execute(tiny_config).success
    again = execute(tiny_config, ("ldm_model",), raise_on_error=False)
    assert again.success
    return str(materialized_metadata(again, "ldm_model")["ldm_version"])


def _champion() -> str:
    return MlflowClient().get_model_version_by_alias("ldm", "champion").version


@pytest.mark.slow
def test_a_registry_error_is_a_retryable_failure_never_no_champion(candidate, tiny_config, monkeypatch):
    """The registry fails once where the gate reads the champion: the step fails and Dagster retries it; the retry
    judges the candidate against the real champion."""
    champion = _champion()
    lookup = MlflowClient.get_model_version_by_alias
    failures = []

    def unavailable_once(client, name, alias):
        if not failures:
            failures.append(alias)
            raise MlflowException("the registry's database is unavailable", error_code="TEMPORARILY_UNAVAILABLE")
        return lookup(client, name, alias)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", unavailable_once)
    result = execute(tiny_config, ("evaluation_report",), raise_on_error=False)
    assert failures == ["champion"] and result.success
    assert step_events(result, "evaluation_report").count("STEP_UP_FOR_RETRY") == 1
    md = materialized_metadata(result, "evaluation_report")
    assert md["champion_before"] == f"ldm v{champion}" and "first model" not in md["gate_reasons"][0]


@pytest.mark.slow
def test_a_champion_without_metrics_is_evaluated_again(candidate, tiny_config):
    client = MlflowClient()
    champion = _champion()
    client.delete_model_version_tag("ldm", champion, METRICS_TAG)
    result = execute(tiny_config, ("evaluation_report",), raise_on_error=False)
    assert result.success
    md = materialized_metadata(result, "evaluation_report")
    assert md["champion_before"] == f"ldm v{champion}" and "first model" not in md["gate_reasons"][0]
    # the champion carries its metrics again, measured on the same held-out data as the candidate
    assert "psnr" in client.get_model_version("ldm", champion).tags[METRICS_TAG]


@pytest.mark.slow
def test_a_failed_gate_is_a_failed_warn_check_and_the_report_is_materialized(candidate, tiny_config):
    """A candidate below a threshold: the report materializes, the champion stays, and the asset check
    promotion_gate fails with severity WARN and the reason (red in the Dagster UI)."""
    champion = _champion()
    config = copy.deepcopy(tiny_config)
    gate = {"rules": {"psnr": {"higher_is_better": True, "min": 1000.0, "tolerance": None}}}
    config["ops"]["evaluation_report"]["config"].setdefault("evaluation", {})["gate"] = gate
    result = execute(config, ("evaluation_report",), raise_on_error=False)
    assert result.success
    md = materialized_metadata(result, "evaluation_report")
    assert md["gate_passed"] is False and md["promotion"].startswith("gate_failed")
    [check] = [c for c in result.get_asset_check_evaluations() if c.check_name == "promotion_gate"]
    assert check.passed is False and check.severity == dg.AssetCheckSeverity.WARN
    assert "psnr" in check.description and md["ldm_uri"] in check.description
    assert _champion() == champion
