"""The promotion gate: first models, better / worse / within-tolerance candidates, thresholds, and metrics that were
not computed."""

import json

import pytest
from pydantic import ValidationError

from ldm_core.evaluation.gate import GateConfig, MetricRule, decide
from ldm_core.evaluation.metrics import MetricResult


def results(**values) -> dict[str, MetricResult]:
    return {
        k: MetricResult(k, v, 100) if v is not None else MetricResult.not_computed(k, f"{k} weights missing")
        for k, v in values.items()
    }


CONFIG = GateConfig(
    rules={
        "color_acc": MetricRule(higher_is_better=True, min=0.9, tolerance=0.02),
        "shape_acc": MetricRule(higher_is_better=True, min=0.7, tolerance=0.02),
        "psnr": MetricRule(higher_is_better=True, tolerance=0.1),
        "fid": MetricRule(higher_is_better=False, max=50.0, tolerance=1.0, relative_tolerance=0.05),
    }
)


def test_first_model_passes_on_thresholds_alone():
    d = decide(results(color_acc=0.95, shape_acc=0.8, psnr=20.0, fid=30.0), None, CONFIG)
    assert d.passed and d.first_model
    assert "first model" in d.reasons[0] and "3 threshold(s) met" in d.reasons[0]
    assert all(c.verdict == "not compared" and c.note == "no champion" for c in d.comparisons)


def test_first_model_below_a_threshold_fails_and_says_by_how_much():
    d = decide(results(color_acc=0.85, shape_acc=0.8, psnr=20.0, fid=62.5), None, CONFIG)
    assert not d.passed
    assert any("color_acc = 0.85 is below the minimum 0.9 (short by 0.05)" in r for r in d.reasons)
    assert any("fid = 62.5 is above the maximum 50 (over by 12.5)" in r for r in d.reasons)
    assert len(d.reasons) == 2
    by_metric = {c.metric: c for c in d.comparisons}
    assert by_metric["color_acc"].threshold_ok is False and by_metric["shape_acc"].threshold_ok is True


def test_a_better_candidate_passes():
    champion = results(color_acc=0.92, shape_acc=0.75, psnr=22.0, fid=40.0)
    d = decide(results(color_acc=0.96, shape_acc=0.8, psnr=23.0, fid=35.0), champion, CONFIG)
    assert d.passed and not d.first_model
    assert {c.metric: c.verdict for c in d.comparisons} == {
        "color_acc": "better",
        "shape_acc": "better",
        "psnr": "better",
        "fid": "better",
    }
    assert "4 metric(s) (4 better)" in d.reasons[0]
    fid = next(c for c in d.comparisons if c.metric == "fid")
    assert fid.delta == pytest.approx(-5.0) and not fid.higher_is_better


def test_a_worse_candidate_fails_naming_the_metric_and_the_margin():
    champion = results(color_acc=0.95, shape_acc=0.8, psnr=24.19, fid=30.0)
    d = decide(results(color_acc=0.95, shape_acc=0.8, psnr=23.19, fid=34.0), champion, CONFIG)
    assert not d.passed
    # PSNR: higher is better, 1 dB worse with 0.1 allowed; FID: lower is better, 4 worse with max(1, 5%·30)=1.5
    assert d.reasons == [
        "psnr = 23.19 is worse than the champion's 24.19 by 1 (higher is better; tolerance 0.1)",
        "fid = 34 is worse than the champion's 30 by 4 (lower is better; tolerance 1.5)",
    ]
    verdicts = {c.metric: c.verdict for c in d.comparisons}
    assert verdicts == {"color_acc": "equal", "shape_acc": "equal", "psnr": "worse", "fid": "worse"}


def test_slightly_worse_within_tolerance_passes():
    champion = results(color_acc=0.95, shape_acc=0.8, psnr=24.0, fid=100.0)
    # 0.01 below on colour (0.02 allowed), 0.05 dB on PSNR (0.1 allowed), FID +4 where 5% of 100 = 5 is allowed
    d = decide(
        results(color_acc=0.94, shape_acc=0.8, psnr=23.95, fid=104.0),
        champion,
        CONFIG.model_copy(
            update={"rules": {**CONFIG.rules, "fid": CONFIG.rules["fid"].model_copy(update={"max": None})}}
        ),
    )
    assert d.passed, d.reasons
    by_metric = {c.metric: c for c in d.comparisons}
    assert by_metric["color_acc"].verdict == "within tolerance"
    assert by_metric["fid"].verdict == "within tolerance" and by_metric["fid"].allowed == pytest.approx(5.0)


def test_not_computed_metrics_are_ignored_by_default_and_fail_when_required():
    champion = results(color_acc=0.95, shape_acc=0.8, psnr=24.0, fid=30.0)
    candidate = results(color_acc=0.95, shape_acc=0.8, psnr=24.0, fid=None)  # no Inception weights here
    d = decide(candidate, champion, CONFIG)
    assert d.passed
    assert any(r.startswith("fid: not computed (fid weights missing); ignored") for r in d.reasons)
    strict = decide(candidate, champion, CONFIG.model_copy(update={"not_computed": "fail"}))
    assert not strict.passed and strict.reasons == ["fid: not computed (fid weights missing), and the gate requires it"]
    # a metric absent from the candidate altogether counts as not computed
    absent = decide(
        {k: v for k, v in candidate.items() if k != "fid"}, champion, CONFIG.model_copy(update={"not_computed": "fail"})
    )
    assert not absent.passed and "fid: not computed (absent)" in absent.reasons[0]


def test_a_metric_the_champion_lacks_is_not_compared():
    champion = results(color_acc=0.95, shape_acc=0.8, psnr=24.0, fid=None)
    d = decide(results(color_acc=0.95, shape_acc=0.8, psnr=24.0, fid=45.0), champion, CONFIG)
    assert d.passed
    fid = next(c for c in d.comparisons if c.metric == "fid")
    assert fid.verdict == "not compared" and fid.note == "champion lacks it" and fid.threshold_ok is True


def test_metrics_json_dicts_and_plain_numbers_are_accepted():
    # the champion's metrics come back from its metrics.json; numbers come from an MLflow run
    champion = json.loads(json.dumps({k: v.to_dict() for k, v in results(psnr=24.0, color_acc=0.9).items()}))
    d = decide({"psnr": 23.0, "color_acc": 0.95}, champion, GateConfig())
    assert not d.passed and d.reasons[0].startswith("psnr = 23 is worse than the champion's 24")


def test_default_config_has_a_direction_for_every_known_metric_and_no_thresholds():
    config = GateConfig()
    assert config.rules["fid"].higher_is_better is False and config.rules["psnr"].higher_is_better is True
    assert all(r.min is None and r.max is None for r in config.rules.values())
    assert decide({}, None, config).passed  # nothing measured, nothing required: documented "ignore" policy


def test_configs_are_strict_and_consistent():
    with pytest.raises(ValidationError):
        GateConfig(rules={"psnr": {"higher_is_better": True, "minimum": 20}})  # misspelled key
    with pytest.raises(ValidationError, match="no value could pass"):
        MetricRule(higher_is_better=True, min=0.9, max=0.8)
    with pytest.raises(ValidationError, match="≥ 0"):
        MetricRule(higher_is_better=True, tolerance=-0.1)
    parsed = GateConfig.model_validate(
        {"rules": {"psnr": {"higher_is_better": True, "min": 20}}, "not_computed": "fail"}
    )
    assert parsed.rules["psnr"].min == 20 and parsed.rules["psnr"].tolerance == 0.0
