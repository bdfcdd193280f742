"""Bounds the trainer configs should enforce themselves, for callers of ldm_core that do not go through the
pipeline's validation (which does check them, see pipeline/validation.py). Today a zero `checkpoint_every` or
`log_every` is accepted and the run dies with ZeroDivisionError at its first step, and a non-positive lr trains
nothing. The configs bound them (`Field(ge=1)` on checkpoint_every and log_every, `Field(gt=0)` on lr)."""

import pytest
from pydantic import ValidationError

from ldm_core.trainers.autoencoder import AutoencoderTrainerConfig
from ldm_core.trainers.ldm import LDMTrainerConfig


@pytest.mark.parametrize("config", [AutoencoderTrainerConfig, LDMTrainerConfig])
@pytest.mark.parametrize("field, value", [("checkpoint_every", 0), ("log_every", 0), ("lr", 0.0), ("lr", -1e-4)])
def test_trainer_configs_refuse_values_that_cannot_train(config, field, value):
    with pytest.raises(ValidationError, match=field):
        config(**{field: value})
