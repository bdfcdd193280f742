"""Input that cannot hurt: the adversarial corpus of benchmarks/faults/adversarial.py ingested from a local folder and
from s3:// (moto) with inline credentials — every bad row dropped and counted under its reason, every good row kept,
the planted secret outside the source never read, the rerun reading nothing — plus the run-config names that would
leave the storage root, credentials in MLflow and Dagster, and the bounds of a text-to-image request."""

from __future__ import annotations

import logging
import sqlite3

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import s3fs
import torch
import yaml

from benchmarks.faults import adversarial as adv
from ldm_core import storage
from ldm_core.data import ingest
from ldm_core.data.canonical import MANIFEST_NAME
from ldm_core.init_weights import _init_weights
from ldm_core.interop.folders import describe
from ldm_core.models.unet import UNetConfig
from ldm_core.request_limits import MAX_GUIDANCE, MAX_ROWS, MAX_SEED, MAX_STEPS, RequestRefused
from pipeline import cli
from pipeline.config_bridge import ConfigValidationError
from pipeline.definitions import defs
from pipeline.pyfunc.text_to_image import TextToImageModel
from pipeline.resources import StorageResource
from pipeline.validation import check_sections

# ---------------------------------------------------------------------------------------------------------------
# The adversarial corpus, locally and on S3
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)  # a FIFO or /dev/zero opened and read would hang the ingestion: fail, not hang
@pytest.mark.parametrize("layout", ["imagefolder", "parquet"])
def test_adversarial_corpus_local_each_bad_row_counted_secret_unread_rerun_passes(tmp_path, layout):
    corpus = adv.build_corpus(tmp_path / "corpus")
    src, exp = corpus.sources[layout]
    assert adv.run_case(str(src), layout, str(tmp_path / "ds"), exp, corpus.secret) == []


@pytest.mark.parametrize("layout", ["imagefolder", "parquet"])
def test_adversarial_corpus_on_s3_with_inline_credentials_reads_no_local_file(
    s3_endpoint, s3_url, tmp_path, layout, caplog
):
    corpus = adv.build_corpus(tmp_path / "corpus", local_extras=False)
    src, exp = corpus.sources[layout]
    assert adv.upload(src, f"{s3_url}/src") > 3
    # s3://KEY:SECRET@bucket/…, the secret holding "/" and "+" as AWS secrets do; moto accepts any key
    source = adv.s3_source_url(f"s3://{s3_endpoint.bucket}", f"{s3_url.split('/', 3)[3]}/src")
    assert adv.CREDENTIALS[1] in source
    s3fs.S3FileSystem.clear_instance_cache()
    with caplog.at_level(logging.INFO):
        assert adv.run_case(source, layout, f"{s3_url}/ds", exp, corpus.secret) == []
    manifest = storage.read_text(storage.join(f"{s3_url}/ds", MANIFEST_NAME))
    result = ingest(adv.ingest_config(source, layout), f"{s3_url}/ds").model_dump_json()
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for where, text in (("manifest", manifest), ("result", result), ("logs", logs)):
        assert not any(c in text for c in adv.CREDENTIALS), f"credentials in the {where}"
    assert f"s3://{s3_endpoint.bucket}/" in manifest  # the source is recorded, without its credentials


def test_metadata_file_over_the_limit_refuses_the_source_in_one_line_naming_it(tmp_path):
    corpus = adv.build_corpus(tmp_path / "corpus", local_extras=False)
    src, _ = corpus.sources["imagefolder"]
    config = adv.ingest_config(str(src), "imagefolder").model_copy(update={"max_metadata_bytes": 2**20})
    with pytest.raises(ValueError) as e:  # metadata.jsonl holds a 2 MiB line
        ingest(config, str(tmp_path / "ds"))
    assert "metadata.jsonl" in str(e.value) and "max_metadata_bytes" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "ds" / MANIFEST_NAME).exists()


def test_redact_url_removes_userinfo_even_with_a_slash_in_the_secret():
    assert storage.redact_url("s3://AKIA:ab/c+d@bucket/p") == "s3://bucket/p"
    assert storage.redact_url("https://user:pass@host/x?y") == "https://host/x?y"
    assert storage.redact_url("https://user@host/x") == "https://host/x"
    assert storage.redact_url("s3://bucket/user@example.com/p") == "s3://bucket/user@example.com/p"
    assert storage.redact_url("/local/a@b") == "/local/a@b"


# ---------------------------------------------------------------------------------------------------------------
# Names that would leave the storage root
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["/etc", "../escape", "a/../../escape", "s3://other-bucket/x", "photos", ".", ""])
def test_image_dataset_name_outside_datasets_is_refused_naming_the_field(name):
    with pytest.raises(ConfigValidationError) as e:
        check_sections({"ops": {"image_dataset": {"config": {"name": name}}}})
    assert "image_dataset.name" in str(e.value)


def test_image_dataset_name_in_a_subfolder_is_accepted():
    check_sections({"ops": {"image_dataset": {"config": {"name": "team/cats-v2"}}}})


def test_storage_urls_stay_under_the_root(tmp_path):
    store = StorageResource(root=str(tmp_path))
    assert store.url("datasets", "team/cats") == str(tmp_path / "datasets" / "team" / "cats")
    for part in ("/etc", "../x", "a/../../x", "file:///etc"):
        with pytest.raises(ValueError, match="storage root"):
            store.url("datasets", part)
    with pytest.raises(ValueError, match="resources.storage.root"):
        StorageResource(root="s3://KEY:SECRET@bucket/root").url("datasets", "x")


# ---------------------------------------------------------------------------------------------------------------
# Inline credentials reach neither MLflow nor Dagster
# ---------------------------------------------------------------------------------------------------------------


def test_image_dataset_with_inline_credentials_keeps_them_out_of_mlflow_and_dagster(
    s3_endpoint, s3_url, tmp_path, monkeypatch, caplog
):
    corpus = adv.build_corpus(tmp_path / "corpus", local_extras=False)
    src, exp = corpus.sources["parquet"]
    adv.upload(src, f"{s3_url}/src")
    source = adv.s3_source_url(f"s3://{s3_endpoint.bucket}", f"{s3_url.split('/', 3)[3]}/src")
    home = tmp_path / "home"
    (home / "dagster").mkdir(parents=True)
    for k, v in {
        "LDM_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
    }.items():
        monkeypatch.setenv(k, v)
    for k in ("LDM_STORAGE_ROOT", "LDM_MLFLOW_ARTIFACTS", "LDM_RUN_CONFIG", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(k, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    ingest_section = {
        "layout": "parquet",
        "max_image_bytes": adv.MAX_IMAGE_BYTES,
        "max_bad_fraction": adv.MAX_BAD_FRACTION,
        "val_fraction": 0.0,
    }
    config = {
        "ops": {
            "image_dataset": {
                "config": {"source": source, "name": "adversarial", "photo_crops": 0, "ingest": ingest_section}
            }
        }
    }
    job = defs.resolve_job_def("ldm_training_job").get_subset(asset_selection={dg.AssetKey("image_dataset")})
    with caplog.at_level(logging.INFO), dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(run_config=config, instance=instance)
        assert result.success
        # everything Dagster keeps of the run but its run config (which holds the URL as the user typed it)
        records = instance.get_records_for_run(result.run_id).records
        event_log = "\n".join(str(r.event_log_entry) for r in records)
    [mat] = result.asset_materializations_for_node("image_dataset")
    assert mat.metadata["rows_total"].value == exp.rows
    con = sqlite3.connect(home / "mlflow.db")
    params = con.execute("select key, value from params").fetchall()
    tags = con.execute("select key, value from tags").fetchall()
    con.close()
    assert any(k == "source" and v.startswith(f"s3://{s3_endpoint.bucket}/") for k, v in params), params
    texts = {
        "mlflow params": repr(params),
        "mlflow tags": repr(tags),
        "dagster metadata": repr(mat.metadata),
        "dagster event log": event_log,
        "logs": "\n".join(r.getMessage() for r in caplog.records),
    }
    artifacts = home / "mlartifacts"
    texts["mlflow artifacts"] = "\n".join(p.read_text(errors="replace") for p in artifacts.rglob("*.json"))
    leaks = [where for where, text in texts.items() if any(c in text for c in adv.CREDENTIALS)]
    assert leaks == []


def test_new_data_sensor_ticks_show_the_source_without_credentials(s3_endpoint, s3_url, tmp_path, monkeypatch):
    storage.write_bytes_atomic(f"{s3_url}/src/a.png", adv.good_png(0))
    source = adv.s3_source_url(f"s3://{s3_endpoint.bucket}", f"{s3_url.split('/', 3)[3]}/src")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"ops": {"image_dataset": {"config": {"source": source}}}}))
    monkeypatch.setenv("LDM_RUN_CONFIG", str(cfg))
    s3fs.S3FileSystem.clear_instance_cache()
    sensor = defs.resolve_sensor_def("ldm_new_data_sensor")
    with dg.instance_for_test() as instance:
        first = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
        same = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=first.cursor))
    assert "baseline" in first.skip_message and "no change" in same.skip_message
    for message in (first.skip_message, same.skip_message):
        assert f"s3://{s3_endpoint.bucket}/" in message and not any(c in message for c in adv.CREDENTIALS)


def test_pretrained_and_init_sources_are_described_without_credentials():
    # what vae_model and ldm_model record of where their starting weights came from (metadata, params, logs)
    assert describe("s3://AKIA:se/cret@bucket/sd", "vae") == "s3://bucket/sd (subfolder vae)"
    weights = _init_weights(UNetConfig(), {"w": torch.zeros(2)}, source="https://u:p@host/unet")
    assert weights.source == "https://host/unet"


# ---------------------------------------------------------------------------------------------------------------
# The bounds of a text-to-image request
# ---------------------------------------------------------------------------------------------------------------


class _Generator:
    """Stands in for the loaded bundle: records what predict asks it for (the bounds come before any sampling)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, *, seed, steps, guidance):
        self.calls.append((prompts[0], seed, steps, guidance))
        return np.zeros((1, 4, 4, 3), np.uint8)


def _model():
    model = TextToImageModel()
    model.model = _Generator()
    return model


@pytest.mark.parametrize(
    "frame, field",
    [
        ({"prompt": ["a"], "steps": [MAX_STEPS + 1]}, "steps"),
        ({"prompt": ["a"], "steps": [0]}, "steps"),
        ({"prompt": ["a"], "steps": [2.5]}, "steps"),
        ({"prompt": ["a"], "guidance": [float("inf")]}, "guidance"),
        ({"prompt": ["a"], "guidance": [-1.0]}, "guidance"),
        ({"prompt": ["a"], "guidance": [MAX_GUIDANCE + 1]}, "guidance"),
        ({"prompt": ["a"], "seed": [-1]}, "seed"),
        ({"prompt": ["a"], "seed": [float(MAX_SEED) * 4]}, "seed"),
        ({"prompt": ["a"] * (MAX_ROWS + 1)}, "rows"),
        ({"prompt": []}, "rows"),
        ({"prompt": ["x" * 10_001]}, "prompt"),
    ],
)
def test_served_model_refuses_requests_beyond_the_bounds_before_sampling(frame, field):
    model = _model()
    with pytest.raises(RequestRefused, match=field) as e:
        model.predict(None, pd.DataFrame(frame))
    assert "\n" not in str(e.value)
    assert model.model.calls == []


def test_served_model_accepts_requests_at_the_bounds():
    model = _model()
    frame = pd.DataFrame(
        {
            "prompt": ["a"] * MAX_ROWS,
            "seed": np.arange(MAX_ROWS, dtype=np.int64),
            "steps": np.full(MAX_ROWS, MAX_STEPS, np.int64),
            "guidance": np.full(MAX_ROWS, MAX_GUIDANCE),
        }
    )
    frame.loc[1, "guidance"] = np.nan  # pandas' missing number: the model's default
    frame.loc[2, "seed"] = MAX_SEED
    out = model.predict(None, frame)
    assert out.shape == (MAX_ROWS, 4, 4, 3)
    assert model.model.calls[0] == ("a", 0, MAX_STEPS, MAX_GUIDANCE)
    assert model.model.calls[1] == ("a", 1, MAX_STEPS, None)
    assert model.model.calls[2][1] == MAX_SEED


@pytest.mark.parametrize(
    "args, field",
    [
        (["--steps", str(MAX_STEPS + 1)], "steps"),
        (["--guidance", "inf"], "guidance"),
        (["--guidance", "nan"], "guidance"),
        (["-n", str(MAX_ROWS + 1)], "-n"),
        (["-n", "0"], "-n"),
        (["--seed", "-5"], "seed"),
    ],
)
def test_ldm_sample_refuses_requests_beyond_the_bounds_before_loading(args, field, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_HOME", str(tmp_path / "home"))
    rc = cli.main(
        ["sample", "--model", str(tmp_path / "no-model"), "--prompt", "a", "-o", str(tmp_path / "g.png"), *args]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert field in err and "cannot load" not in err, err
    assert not (tmp_path / "home").exists()  # refused before anything was prepared or loaded
