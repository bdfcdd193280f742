"""The gate fails closed on NaN: a non-finite threshold or tolerance is refused, and a NaN metric (the candidate's or
the champion's) or a NaN threshold that got past validation never lets a candidate through."""

import math

import pytest
from pydantic import ValidationError

from ldm_core.evaluation.gate import GateConfig, MetricRule, decide


@pytest.mark.parametrize("field", ["min", "max", "tolerance", "relative_tolerance"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_thresholds_and_tolerances_are_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError) as e:
        GateConfig.model_validate({"rules": {"color_acc": {"higher_is_better": True, field: value}}})
    (error,) = e.value.errors()
    assert error["loc"] == ("rules", "color_acc", field) and "finite" in error["msg"]


def test_a_nan_threshold_that_got_past_validation_still_fails_a_zero_accuracy():
    rule = MetricRule.model_construct(
        higher_is_better=True, min=math.nan, max=None, tolerance=0.02, relative_tolerance=0.0
    )
    for bound in ("min", "max"):
        nan_rule = rule.model_copy(update={"min": None, bound: math.nan})
        d = decide(
            {"color_acc": 0.0}, None, GateConfig.model_construct(rules={"color_acc": nan_rule}, not_computed="ignore")
        )
        assert not d.passed, bound


def test_a_nan_candidate_metric_fails_thresholds_and_the_champion_comparison():
    config = GateConfig(
        rules={
            "color_acc": MetricRule(higher_is_better=True, min=0.5),
            "psnr": MetricRule(higher_is_better=True, tolerance=0.1),
        }
    )
    d = decide({"color_acc": 0.9, "psnr": math.nan}, {"color_acc": 0.9, "psnr": 20.0}, config)
    assert not d.passed and any(r.startswith("psnr = nan") for r in d.reasons)
    d = decide({"color_acc": math.nan, "psnr": 21.0}, None, config)
    assert not d.passed and any(r.startswith("color_acc = nan") for r in d.reasons)


def test_a_nan_champion_metric_cannot_be_beaten_by_being_compared():
    config = GateConfig(rules={"psnr": MetricRule(higher_is_better=True, tolerance=0.1, relative_tolerance=0.05)})
    assert not decide({"psnr": 21.0}, {"psnr": math.nan}, config).passed


def test_equal_infinities_are_equal():
    """A perfect reconstruction's PSNR is inf on both sides: inf - inf is NaN, which must not read as worse."""
    config = GateConfig(rules={"psnr": MetricRule(higher_is_better=True, tolerance=0.1)})
    d = decide({"psnr": math.inf}, {"psnr": math.inf}, config)
    assert d.passed and d.comparisons[0].verdict == "equal"
