"""Evaluation: metrics (PSNR, SSIM, LPIPS, FID/rFID, attribute accuracy), the promotion gate, the HTML report.

Each metric is a :class:`MetricResult` that carries its sample size, or says why it was not computed; the gate
(:func:`decide`) turns a candidate's metrics and the champion's into a decision with reasons; :func:`write_report`
writes the self-contained HTML page, ``metrics.json`` and the PNGs; :func:`evaluate` does all of it in one call from a
model's generate/reconstruct functions (what the ``evaluation_report`` asset calls).
"""

from ldm_core.evaluation.attributes import (
    accuracy_metrics,
    attribute_accuracy,
    evaluator_accuracy,
    parse_caption,
    predict_attributes,
)
from ldm_core.evaluation.evaluate import (
    EvaluationConfig,
    EvaluationResult,
    HeldOut,
    evaluate,
    held_out_from_dataset,
    text_to_image_functions,
)
from ldm_core.evaluation.fid import (
    frechet_distance,
    frechet_inception_distance,
    inception_or_reason,
    load_inception,
)
from ldm_core.evaluation.gate import GateConfig, GateDecision, MetricComparison, MetricRule, decide
from ldm_core.evaluation.metrics import HIGHER_IS_BETTER, MetricResult, lpips, metric_value, psnr, ssim
from ldm_core.evaluation.report import ReportResult, SampleGrid, collect_versions, write_report

__all__ = [
    "EvaluationConfig",
    "EvaluationResult",
    "HeldOut",
    "evaluate",
    "held_out_from_dataset",
    "text_to_image_functions",
    "GateConfig",
    "GateDecision",
    "HIGHER_IS_BETTER",
    "MetricComparison",
    "MetricResult",
    "MetricRule",
    "ReportResult",
    "SampleGrid",
    "accuracy_metrics",
    "attribute_accuracy",
    "collect_versions",
    "decide",
    "evaluator_accuracy",
    "frechet_distance",
    "frechet_inception_distance",
    "inception_or_reason",
    "load_inception",
    "lpips",
    "metric_value",
    "parse_caption",
    "predict_attributes",
    "psnr",
    "ssim",
    "write_report",
]
