"""`version_by_alias` on a real (SQLite) registry: "no such model or alias" is None, a failing registry raises."""

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.registry import version_by_alias

pytestmark = pytest.mark.slow  # creating the SQLite registry's tables takes tens of seconds on 2 cores


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("ldm")
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    for _ in range(2):
        client.create_model_version("ldm", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("ldm", "champion", "1")
    return client


def test_an_alias_is_its_version_and_a_missing_model_or_alias_is_none(client):
    assert str(version_by_alias(client, "ldm", "champion").version) == "1"
    assert version_by_alias(client, "ldm", "candidate") is None
    assert version_by_alias(client, "nope", "champion") is None


@pytest.mark.parametrize("code", ["TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "INVALID_PARAMETER_VALUE"])
def test_a_registry_error_raises(client, monkeypatch, code):
    """Including INVALID_PARAMETER_VALUE (what a missing alias also gets) for an alias that does exist."""

    def failing(name, alias):
        raise MlflowException("the registry failed", error_code=code)

    monkeypatch.setattr(client, "get_model_version_by_alias", failing)
    with pytest.raises(MlflowException, match="registry"):
        version_by_alias(client, "ldm", "champion")


def test_an_unreachable_registry_raises(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once, not after minutes of backoff
    client = MlflowClient(tracking_uri="http://127.0.0.1:9", registry_uri="http://127.0.0.1:9")
    with pytest.raises(MlflowException):
        version_by_alias(client, "ldm", "champion")
