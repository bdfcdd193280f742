"""The promotion gate: does a candidate model deserve the registry's ``champion`` alias?

A candidate passes when (1) every metric with a threshold meets it, and (2) when there is a champion, no metric is
worse than the champion's by more than that metric's tolerance. The first model (no champion) needs only (1).

Metrics that were not computed (e.g. FID without the Inception weights on an offline machine) are handled by
:attr:`GateConfig.not_computed`: ``"ignore"`` (default) skips them for both checks and says so in the reasons, so
an offline newcomer can still promote a model; ``"fail"`` makes any ruled metric that is missing a failure, for
deployments where every metric must be measured. A metric the champion lacks cannot be compared and is skipped
with a note.

The gate fails closed: thresholds and tolerances must be finite numbers (a NaN compares false with everything, so a
``.nan`` minimum would let any value through), and a NaN metric value, the candidate's or the champion's, fails the
checks it takes part in, because each check is written as "the candidate is good enough" rather than "it is bad".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import Field, FiniteFloat, model_validator

from ldm_core.config import StrictModel
from ldm_core.evaluation.metrics import HIGHER_IS_BETTER, MetricResult, metric_value

Verdict = Literal["better", "equal", "within tolerance", "worse", "not compared"]


class MetricRule(StrictModel):
    """How the gate treats one metric."""

    higher_is_better: bool
    """Direction: True for accuracies, PSNR and SSIM; False for LPIPS, FID and rFID."""
    min: FiniteFloat | None = None
    """The candidate must reach at least this value (None: no lower threshold)."""
    max: FiniteFloat | None = None
    """The candidate must not exceed this value (None: no upper threshold)."""
    tolerance: FiniteFloat | None = 0.0
    """How much worse than the champion the candidate may be, in the metric's units (absolute). None: this metric
    is not compared with the champion at all."""
    relative_tolerance: FiniteFloat = 0.0
    """Extra allowance as a fraction of the champion's value (e.g. 0.05 for FID, whose scale depends on n and data);
    the allowance is the larger of ``tolerance`` and ``relative_tolerance·|champion|``."""

    @model_validator(mode="after")
    def _consistent(self) -> MetricRule:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max}: no value could pass")
        if (self.tolerance is not None and self.tolerance < 0) or self.relative_tolerance < 0:
            raise ValueError("tolerances are allowances for being worse: they must be ≥ 0")
        return self


def _default_rules() -> dict[str, MetricRule]:
    # No thresholds by default (they depend on the data: presets set them); small absolute tolerances that absorb
    # the run-to-run noise of each metric at the report's sample sizes.
    tolerances = {
        "psnr": 0.1,
        "ssim": 0.005,
        "lpips": 0.005,
        "rfid": 0.5,
        "fid": 1.0,
        "color_acc": 0.02,
        "shape_acc": 0.02,
        "size_acc": 0.02,
        "position_acc": 0.02,
    }
    return {
        name: MetricRule(higher_is_better=HIGHER_IS_BETTER[name], tolerance=tol) for name, tol in tolerances.items()
    }


class GateConfig(StrictModel):
    """Thresholds and champion tolerances per metric, and the policy for metrics that were not computed."""

    rules: dict[str, MetricRule] = Field(default_factory=_default_rules)
    """One rule per metric name (as in metrics.json); metrics without a rule do not affect the decision."""
    not_computed: Literal["ignore", "fail"] = "ignore"
    """What a ruled metric that the candidate lacks does: "ignore" skips its threshold and champion comparison (with
    a note in the reasons); "fail" fails the gate."""


@dataclass(frozen=True)
class MetricComparison:
    """One metric of the candidate against its thresholds and the champion."""

    metric: str
    candidate: float | None
    champion: float | None
    higher_is_better: bool
    delta: float | None
    """candidate − champion (None when either is missing)."""
    allowed: float | None
    """How much worse than the champion was allowed (None when not compared)."""
    verdict: Verdict
    threshold_ok: bool | None
    """None when the rule has no threshold or the metric was not computed."""
    note: str = ""


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str]
    """On failure: each failed check, with the metric and by how much. On success: why it passed."""
    comparisons: list[MetricComparison] = field(default_factory=list)
    first_model: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MetricsLike = Mapping[str, MetricResult | Mapping[str, Any] | float | int | None]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def decide(candidate_metrics: MetricsLike, champion_metrics: MetricsLike | None, config: GateConfig) -> GateDecision:
    """Judge a candidate (metrics as results, metrics.json dicts or numbers) against thresholds and the champion."""
    failures: list[str] = []
    notes: list[str] = []
    comparisons = [
        _judge_metric(name, rule, candidate_metrics, champion_metrics, config, failures, notes)
        for name, rule in config.rules.items()
    ]
    first_model = champion_metrics is None
    if failures:
        return GateDecision(False, failures + notes, comparisons, first_model)
    return GateDecision(True, _pass_reasons(comparisons, first_model) + notes, comparisons, first_model)


def _judge_metric(
    name: str,
    rule: MetricRule,
    candidate_metrics: MetricsLike,
    champion_metrics: MetricsLike | None,
    config: GateConfig,
    failures: list[str],
    notes: list[str],
) -> MetricComparison:
    """One metric's comparison; each check it fails goes to ``failures``, what the gate skipped to ``notes``."""
    cand = metric_value(candidate_metrics.get(name))
    champ = None if champion_metrics is None else metric_value(champion_metrics.get(name))
    if cand is None:
        if config.not_computed == "fail":
            failures.append(f"{name}: not computed{_why(candidate_metrics.get(name))}, and the gate requires it")
        else:
            notes.append(f"{name}: not computed{_why(candidate_metrics.get(name))}; ignored by the gate")
        return MetricComparison(
            name, None, champ, rule.higher_is_better, None, None, "not compared", None, "not computed"
        )
    if math.isnan(cand):
        failures.append(f"{name} = nan: not a number, so it meets no threshold and beats no champion")
        return MetricComparison(name, cand, champ, rule.higher_is_better, None, None, "worse", False, "not a number")
    threshold_ok = _check_thresholds(name, rule, cand, failures)
    if champ is None or rule.tolerance is None:
        note = (
            "no champion"
            if champion_metrics is None
            else "not compared (rule has no tolerance)"
            if rule.tolerance is None
            else "champion lacks it"
        )
        return MetricComparison(
            name, cand, champ, rule.higher_is_better, None, None, "not compared", threshold_ok, note
        )
    return _against_champion(name, rule, cand, champ, threshold_ok, failures)


def _check_thresholds(name: str, rule: MetricRule, cand: float, failures: list[str]) -> bool | None:
    """The absolute thresholds: None when the rule has none. Written "not (meets it)", so that a NaN fails."""
    if rule.min is None and rule.max is None:
        return None
    threshold_ok = True
    if rule.min is not None and not cand >= rule.min:
        threshold_ok = False
        failures.append(
            f"{name} = {_fmt(cand)} is below the minimum {_fmt(rule.min)} (short by {_fmt(rule.min - cand)})"
        )
    if rule.max is not None and not cand <= rule.max:
        threshold_ok = False
        failures.append(
            f"{name} = {_fmt(cand)} is above the maximum {_fmt(rule.max)} (over by {_fmt(cand - rule.max)})"
        )
    return threshold_ok


def _against_champion(
    name: str, rule: MetricRule, cand: float, champ: float, threshold_ok: bool | None, failures: list[str]
) -> MetricComparison:
    """Not worse than the champion beyond the rule's tolerance."""
    delta = 0.0 if cand == champ else cand - champ  # equal infinities (a perfect PSNR) are equal, not NaN apart
    worse_by = -delta if rule.higher_is_better else delta  # > 0: the candidate is worse
    allowed = max(rule.tolerance, rule.relative_tolerance * abs(champ))
    if not worse_by <= allowed:  # NaN (a NaN metric on either side) is not within the tolerance
        verdict: Verdict = "worse"
        direction = "higher" if rule.higher_is_better else "lower"
        failures.append(
            f"{name} = {_fmt(cand)} is worse than the champion's {_fmt(champ)} by {_fmt(worse_by)} "
            f"({direction} is better; tolerance {_fmt(allowed)})"
        )
    elif worse_by > 0:
        verdict = "within tolerance"
    elif worse_by == 0:
        verdict = "equal"
    else:
        verdict = "better"
    return MetricComparison(name, cand, champ, rule.higher_is_better, delta, allowed, verdict, threshold_ok)


def _pass_reasons(comparisons: list[MetricComparison], first_model: bool) -> list[str]:
    checked_thresholds = sum(c.threshold_ok is not None for c in comparisons)
    if first_model:
        return [f"first model (no champion): all {checked_thresholds} threshold(s) met"]
    compared = [c for c in comparisons if c.verdict != "not compared"]
    better = sum(c.verdict == "better" for c in compared)
    return [
        f"all {checked_thresholds} threshold(s) met; not worse than the champion beyond tolerance on "
        f"{len(compared)} metric(s) ({better} better)"
    ]


def _why(m: Any) -> str:
    if isinstance(m, MetricResult) and m.reason:
        return f" ({m.reason})"
    if isinstance(m, Mapping) and m.get("reason"):
        return f" ({m['reason']})"
    return "" if m is not None else " (absent)"


__all__ = ["GateConfig", "GateDecision", "MetricComparison", "MetricRule", "decide"]
