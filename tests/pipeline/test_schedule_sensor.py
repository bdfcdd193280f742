"""The schedule and the new-data sensor build their run requests (Dagster's own test tools)."""

import datetime

import dagster as dg
import yaml

from ldm_core.data.synthetic import write_shapes_source
from pipeline import run_configs
from pipeline.definitions import defs


def test_weekly_schedule_requests_a_full_run_with_the_configured_config():
    schedule = defs.resolve_schedule_def("ldm_weekly_retrain")
    with dg.instance_for_test() as instance:
        ctx = dg.build_schedule_context(
            instance=instance, scheduled_execution_time=datetime.datetime(2026, 11, 29, 3, 0)
        )
        req = schedule.evaluate_tick(ctx).run_requests[0]
    assert req.run_key == "weekly-2026-11-29"
    # the demo config, asking for a warm start from the champion when it is a valid one
    expected = run_configs.load("demo")
    expected["ops"]["ldm_model"]["config"]["init_from"] = "auto"
    assert req.run_config == expected
    assert schedule.job_name == "ldm_training_job"


def test_sensor_skips_the_generated_default():
    sensor = defs.resolve_sensor_def("ldm_new_data_sensor")
    with dg.instance_for_test() as instance:
        result = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
    assert not result.run_requests and "generated" in result.skip_message


def test_sensor_launches_retraining_when_the_source_grows(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_shapes_source(str(source), 6, seed=1)
    cfg = run_configs.load("demo")
    cfg["ops"]["image_dataset"]["config"]["source"] = str(source)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("LDM_RUN_CONFIG", str(cfg_path))

    sensor = defs.resolve_sensor_def("ldm_new_data_sensor")
    with dg.instance_for_test() as instance:
        first = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
        assert not first.run_requests and "baseline" in first.skip_message
        same = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=first.cursor))
        assert not same.run_requests and "no change" in same.skip_message
        (source / "extra.png").write_bytes((source / "000000.png").read_bytes())
        grown = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=same.cursor or first.cursor))
    req = grown.run_requests[0]
    assert req.job_name in (None, "ldm_retrain_job")
    ops = req.run_config["ops"]
    assert "vae_model" not in ops and {"image_dataset", "latent_store", "ldm_model"} <= set(ops)
    assert ops["image_dataset"]["config"]["source"] == str(source)
    assert ops["ldm_model"]["config"]["init_from"] == "auto"
    dg.validate_run_config(defs.resolve_job_def("ldm_retrain_job"), req.run_config)


def test_retraining_stays_from_scratch_when_the_config_says_so(tmp_path, monkeypatch):
    cfg = run_configs.load("demo")
    cfg["ops"]["ldm_model"]["config"]["init_from"] = "none"
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("LDM_RUN_CONFIG", str(cfg_path))
    schedule = defs.resolve_schedule_def("ldm_weekly_retrain")
    with dg.instance_for_test() as instance:
        ctx = dg.build_schedule_context(
            instance=instance, scheduled_execution_time=datetime.datetime(2026, 11, 29, 3, 0)
        )
        req = schedule.evaluate_tick(ctx).run_requests[0]
    assert req.run_config["ops"]["ldm_model"]["config"]["init_from"] == "none"
