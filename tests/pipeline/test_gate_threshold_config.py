"""A run config with a non-finite gate threshold (`.nan` in YAML) is refused before any work, in one line that names
the field."""

import pytest
import yaml

from pipeline.config_bridge import ConfigValidationError
from pipeline.definitions import defs
from pipeline.validation import check_sections, validate_run_config

RUN_CONFIG = """
ops:
  evaluation_report:
    config:
      evaluation:
        gate:
          rules:
            color_acc: {higher_is_better: true, min: %s}
"""


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_a_non_finite_gate_threshold_is_refused_naming_the_field(value):
    run_config = yaml.safe_load(RUN_CONFIG % value)
    for validate in (check_sections, lambda rc: validate_run_config(rc, defs.resolve_job_def("ldm_training_job"))):
        with pytest.raises(ConfigValidationError) as e:
            validate(run_config)
        (line,) = [x.strip() for x in str(e.value).splitlines()[1:]]
        assert line.startswith("evaluation_report.evaluation.gate.rules.color_acc.min: ") and "finite" in line


def test_a_finite_gate_threshold_is_accepted():
    check_sections(yaml.safe_load(RUN_CONFIG % "0.9"))
