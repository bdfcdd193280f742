"""Run-config validation of `evaluation_report` (see `pipeline.validation`)."""

from ldm_core.evaluation.evaluate import EvaluationConfig
from pipeline.defs.evaluation_report.config import EvaluationReportConfig
from pipeline.validation import RunConfigValidation

CONFIG = EvaluationReportConfig


def validate(v: RunConfigValidation) -> None:
    if v.present("evaluation_report"):
        v.core(EvaluationConfig, v.section("evaluation_report").get("evaluation"), "evaluation_report.evaluation")
