"""The registered models as MLflow 3 serves and shows them, with the pipeline's storage root on S3 (moto).

The module materializes the tiny pipeline once (storage on S3, MLflow on SQLite) with a tiny CLIP text encoder built
in a folder that is deleted once the run is done, and serves in processes whose Hugging Face cache is empty and
offline: the registered model must carry its text encoder. Then it checks what a user of MLflow meets:
`mlflow models predict` on `models:/ldm@candidate` without this project installed, pinned requirements and an
input example, the evaluation metrics on the logged model, the held-out dataset as a run input with its version as
the digest, training images as key/step series, and the evaluation report among the run's artifacts.
"""

import copy
import importlib.metadata
import json
import shutil
import subprocess
import sys
import uuid

import mlflow
import numpy as np
import pytest
from diffusers import DiffusionPipeline
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ldm_core import storage
from ldm_core.bundle import load_text_to_image
from pipeline.mlflow_models import TEXT_TO_IMAGE_PACKAGES, pinned_requirements
from tests.core.tiny_models import tiny_clip
from tests.e2e.helpers import child_env, execute, materialized_metadata, mlflow_run

PROMPTS = ["a large red circle in the center", "a small blue square in the top left"]
STEPS = 3

# `mlflow models predict` (MLflow's own CLI) where this project is not importable, as in an environment built from
# the model's requirements alone; then says where ldm_core came from
PREDICT_WITHOUT_PROJECT = """
import importlib.abc, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pipeline", "dagster"):
            raise ModuleNotFoundError(f"No module named {name!r} (not installed where the model is served)", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
import importlib.metadata, json
import mlflow.pyfunc
from mlflow.cli import cli

before = set(sys.modules)
cli.main(args=sys.argv[1:], prog_name="mlflow", standalone_mode=False)
# the distributions of what loading and predicting imported (beyond MLflow itself)
top = {m.split(".")[0] for m in set(sys.modules) - before}
owners = importlib.metadata.packages_distributions()
print(json.dumps({"ldm_core": sys.modules["ldm_core"].__file__,
                  "imported": sorted({d for m in top if m != "ldm_core" for d in owners.get(m, [])})}))
"""


def served_env(home, tmp_path) -> dict[str, str]:
    """A serving machine's environment: offline, with an empty Hugging Face cache."""
    (tmp_path / "hf_home").mkdir(exist_ok=True)
    return {**child_env(home), "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def training_clip(tmp_path_factory):
    """Where the training machine keeps its text encoder (the store's text_encoder name)."""
    return tmp_path_factory.mktemp("training-machine") / "tiny-clip"


@pytest.fixture(scope="module")
def on_s3(ldm_home, s3_endpoint, tiny_config, training_clip):
    clip = training_clip
    tiny_clip(clip, with_projection=True)
    run_config = copy.deepcopy(tiny_config)
    run_config["ops"]["latent_store"]["config"]["text_encoder"]["name"] = str(clip)
    mp = pytest.MonkeyPatch()
    mp.setenv("LDM_STORAGE_ROOT", s3_endpoint.url(f"servable-{uuid.uuid4().hex[:8]}"))
    try:
        result = execute(run_config)
        assert result.success
        shutil.rmtree(clip)  # the training machine's path is gone: from here on, only the registered copy exists
        yield result
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def served(on_s3, ldm_home, tmp_path_factory):
    """`mlflow models predict` on models:/ldm@candidate: (images, what the serving process reported)."""
    tmp_path = tmp_path_factory.mktemp("predict")
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps(
            {
                "dataframe_split": {
                    "columns": ["prompt", "seed", "steps"],
                    "data": [[p, i, STEPS] for i, p in enumerate(PROMPTS)],
                }
            }
        )
    )
    out = tmp_path / "predictions.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            PREDICT_WITHOUT_PROJECT,
            "models",
            "predict",
            "-m",
            "models:/ldm@candidate",
            "-i",
            str(request),
            "-o",
            str(out),
            "-t",
            "json",
            "--env-manager",
            "local",
        ],
        capture_output=True,
        text=True,
        env=served_env(ldm_home, tmp_path),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.asarray(json.loads(out.read_text())["predictions"]), json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_mlflow_models_predict_serves_the_candidate_without_the_project(served, on_s3):
    images, process = served
    # the model ran on the copy of ldm_core shipped in its code/, not on this checkout's
    assert process["ldm_core"].endswith("/code/ldm_core/__init__.py"), process
    assert images.shape == (2, 32, 32, 3) and images.min() >= 0 and images.max() <= 255
    assert all(img.std() > 5 for img in images)  # pictures, not a blank fill
    # exactly what the trained bundle generates for the same prompt, seed and steps
    bundle = load_text_to_image(materialized_metadata(on_s3, "ldm_model")["ldm_url"])
    for i, prompt in enumerate(PROMPTS):
        expected = bundle.generate([prompt], seed=i, steps=STEPS)[0].astype(int)
        assert np.abs(images[i] - expected).max() <= 1


# torch.cuda imports pynvml when it is installed (it is, for the training runs' GPU metrics) and runs without it
OPTIONAL_IMPORTS = {"nvidia-ml-py"}


def _with_dependencies(names: list[str]) -> set[str]:
    """The packages and, transitively, what they require (as installed here; extras left out)."""
    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        reqs = [Requirement(r) for r in requires]
        todo += [canonicalize_name(r.name) for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]
    return seen


@pytest.mark.slow
def test_the_model_pins_what_it_imports_and_has_an_input_example(served, tmp_path):
    local = mlflow.artifacts.download_artifacts("models:/ldm@candidate", dst_path=str(tmp_path))
    pinned = pinned_requirements(TEXT_TO_IMAGE_PACKAGES)
    assert (tmp_path / "requirements.txt").read_text().split() == pinned
    assert (tmp_path / "code" / "ldm_core" / "bundle.py").is_file()
    # everything the serving process imported is pinned, or comes with a pinned package
    imported = {canonicalize_name(d) for d in served[1]["imported"]}
    assert {"torch", "transformers", "safetensors"} <= imported
    # imported only because they are installed here, by a pinned package that runs without them
    imported -= OPTIONAL_IMPORTS
    assert imported <= _with_dependencies([r.split("==")[0] for r in pinned]), imported - _with_dependencies(
        [r.split("==")[0] for r in pinned]
    )
    example = Model.load(local).load_input_example(local)
    assert list(example.columns) == ["prompt", "seed", "steps"]
    assert (tmp_path / "serving_input_example.json").is_file()


@pytest.mark.slow
def test_evaluation_metrics_are_on_the_logged_model_with_their_dataset(on_s3):
    client = MlflowClient()
    mv = client.get_model_version_by_alias("ldm", "candidate")
    eval_md, ds_md = materialized_metadata(on_s3, "evaluation_report"), materialized_metadata(on_s3, "image_dataset")
    model_id = materialized_metadata(on_s3, "ldm_model")["mlflow_model_id"]
    assert mv.source == f"models:/{model_id}"  # the candidate version is that logged model
    metrics = {m.key: m for m in client.get_logged_model(model_id).metrics or []}
    assert {"psnr", "ssim"} <= set(metrics)
    assert metrics["psnr"].value == pytest.approx(eval_md["psnr"]) and metrics["ssim"].value == pytest.approx(
        eval_md["ssim"]
    )
    assert {(m.dataset_name, m.dataset_digest) for m in metrics.values()} == {
        ("image_dataset", ds_md["dataset_version"])
    }

    run = client.get_run(mlflow_run(on_s3, "evaluation_report").info.run_id)  # search results omit model inputs
    [held_out] = run.inputs.dataset_inputs
    assert (held_out.dataset.name, held_out.dataset.digest) == ("image_dataset", ds_md["dataset_version"])
    assert held_out.dataset.source_type == "s3" and ds_md["dataset_url"] in held_out.dataset.source
    assert {(t.key, t.value) for t in held_out.tags} >= {("mlflow.data.context", "evaluation")}
    assert [m.model_id for m in run.inputs.model_inputs] == [model_id]


def _image_series(run_id: str) -> set[tuple[str, int]]:
    """(key, step) of every image logged with a key (MLflow names them images/<key>+step+<step>+timestamp+…)."""
    names = [a.path.removeprefix("images/") for a in MlflowClient().list_artifacts(run_id, "images")]
    return {(n.split("+")[0], int(n.split("+")[2])) for n in names if "+step+" in n}


@pytest.mark.slow
def test_training_images_are_key_and_step_series(on_s3):
    ldm_steps = materialized_metadata(on_s3, "ldm_model")["steps"]
    assert ("validation_samples", ldm_steps) in _image_series(mlflow_run(on_s3, "ldm_model").info.run_id)
    vae_steps = materialized_metadata(on_s3, "vae_model")["steps"]
    assert ("reconstructions", vae_steps) in _image_series(mlflow_run(on_s3, "vae_model").info.run_id)


@pytest.mark.slow
def test_the_report_on_s3_is_copied_into_mlflow(on_s3, tmp_path):
    md = materialized_metadata(on_s3, "evaluation_report")
    assert md["report_html"].startswith("s3://")
    run_id = mlflow_run(on_s3, "evaluation_report").info.run_id
    names = {a.path for a in MlflowClient().list_artifacts(run_id, "report")}
    assert {"report/report.html", "report/metrics.json", "report/samples.png"} <= names
    copied = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="report/report.html", dst_path=str(tmp_path)
    )
    assert open(copied, "rb").read() == storage.read_bytes(md["report_html"])


def _ldm(home, tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        env=served_env(home, tmp_path),
        cwd=tmp_path,
        timeout=300,
    )


@pytest.mark.slow
def test_ldm_sample_works_offline_without_the_training_paths(on_s3, ldm_home, tmp_path):
    proc = _ldm(
        ldm_home,
        tmp_path,
        "sample",
        "--model",
        "models:/ldm@candidate",
        "--prompt",
        PROMPTS[0],
        "-n",
        "2",
        "--steps",
        str(STEPS),
        "-o",
        str(tmp_path / "grid.png"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "grid.png").stat().st_size > 0


@pytest.mark.slow
def test_ldm_export_writes_a_folder_that_diffusers_loads_offline(on_s3, ldm_home, tmp_path):
    out = tmp_path / "exported"
    proc = _ldm(ldm_home, tmp_path, "export", "--model", "models:/ldm@candidate", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "will NOT reproduce" in proc.stdout and "text padding" in proc.stdout
    assert {"vae", "unet", "text_encoder", "tokenizer", "scheduler", "model_index.json"} <= {
        p.name for p in out.iterdir()
    }
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"  # tiny.yaml trains a flow model


@pytest.mark.slow
def test_ldm_export_refuses_bad_input_in_one_line(on_s3, ldm_home, tmp_path):
    unknown = _ldm(ldm_home, tmp_path, "export", "--model", "models:/ldm@nonexistent", "-o", str(tmp_path / "a"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    not_empty = _ldm(ldm_home, tmp_path, "export", "--model", "models:/ldm@candidate", "-o", str(full))
    for proc, expected in ((unknown, "no alias 'nonexistent'"), (not_empty, "not an empty directory")):
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "a").exists() and [p.name for p in full.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_a_text_encoder_changed_since_the_store_was_written_is_not_copied_into_the_model(on_s3, training_clip):
    """The model carries the encoder its captions were embedded with: when the source now holds other weights under
    the same name, ldm_model refuses before training, in one line."""
    tiny_clip(training_clip, with_projection=True, seed=1)
    try:
        result = execute(on_s3.dagster_run.run_config, ("ldm_model",), raise_on_error=False)
    finally:
        shutil.rmtree(training_clip)
    [failure] = result.get_step_failure_events()
    message = failure.step_failure_data.error.message
    assert "now loads as" in message and "materialize latent_store again" in message, message
