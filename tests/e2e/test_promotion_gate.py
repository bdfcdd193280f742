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

from pipeline.definitions import defs
from pipeline.promotion import METRICS_TAG


def _run(config: dict, assets: tuple[str, ...]) -> dg.ExecuteInProcessResult:
    job = defs.resolve_job_def("ldm_training_job").get_subset(asset_selection={dg.AssetKey(a) for a in assets})
    with dg.DagsterInstance.get() as instance:
        return job.execute_in_process(
            run_config={"ops": {a: config["ops"][a] for a in assets}}, instance=instance, raise_on_error=False
        )


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    return {k: getattr(v, "value", v) for k, v in result.asset_materializations_for_node(asset)[0].metadata.items()}


@pytest.fixture(scope="module")
def candidate(ldm_home, tiny_config):
    """Champion v1 (the first model) and a newer candidate; returns the candidate's version."""
    with dg.DagsterInstance.get() as instance:
        assert (
            defs.resolve_job_def("ldm_training_job")
            .execute_in_process(run_config=tiny_config, instance=instance)
            .success
        )
    again = _run(tiny_config, ("ldm_model",))
    assert again.success
    return str(_metadata(again, "ldm_model")["ldm_version"])


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
    result = _run(tiny_config, ("evaluation_report",))
    assert failures == ["champion"] and result.success
    events = [e.event_type_value for e in result.all_events if e.step_key == "evaluation_report"]
    assert events.count("STEP_UP_FOR_RETRY") == 1
    md = _metadata(result, "evaluation_report")
    assert md["champion_before"] == f"ldm v{champion}" and "first model" not in md["gate_reasons"][0]


@pytest.mark.slow
def test_a_champion_without_metrics_is_evaluated_again(candidate, tiny_config):
    client = MlflowClient()
    champion = _champion()
    client.delete_model_version_tag("ldm", champion, METRICS_TAG)
    result = _run(tiny_config, ("evaluation_report",))
    assert result.success
    md = _metadata(result, "evaluation_report")
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
    result = _run(config, ("evaluation_report",))
    assert result.success
    md = _metadata(result, "evaluation_report")
    assert md["gate_passed"] is False and md["promotion"].startswith("gate_failed")
    [check] = [c for c in result.get_asset_check_evaluations() if c.check_name == "promotion_gate"]
    assert check.passed is False and check.severity == dg.AssetCheckSeverity.WARN
    assert "psnr" in check.description and md["ldm_uri"] in check.description
    assert _champion() == champion
