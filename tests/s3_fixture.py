"""A real S3 HTTP endpoint on loopback for ``s3://`` tests (moto's threaded server; no MinIO needed).

Loaded for every test through ``pytest_plugins = ["tests.s3_fixture"]`` in tests/conftest.py. Fixtures:

``s3_endpoint`` (session scope) -> `S3Endpoint`
    Starts ``moto.server.ThreadedMotoServer`` on 127.0.0.1 (a free port) once per session, points the
    environment at it (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_DEFAULT_REGION``; ``AWS_ENDPOINT_URL_S3`` is removed), creates the bucket ``S3Endpoint.bucket`` and
    yields. Anything using ``ldm_core.storage`` (s3fs), boto3 or MLflow's S3 artifact store reaches it without
    further options. The previous environment is restored at the end of the session.

``s3_url`` (function scope) -> str
    A fresh, empty prefix ``s3://<bucket>/<test name>-<uuid>`` for one test, so tests never see each other's
    objects.

``storage_root`` (function scope, parametrized ``local`` / ``s3``) -> str
    An empty directory for one test: a local temporary directory, then an ``s3_url``; a test that takes it runs on
    both storages.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

BUCKET = "ldm-test"
_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3Endpoint:
    endpoint_url: str
    """``http://127.0.0.1:<port>``"""
    bucket: str

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts…>``"""
        return "/".join([f"s3://{self.bucket}", *[p.strip("/") for p in parts if p]])

    def storage_options(self) -> dict:
        """Explicit s3fs options for the endpoint (the environment already carries them)."""
        return {
            "key": _ENV["AWS_ACCESS_KEY_ID"],
            "secret": _ENV["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": _ENV["AWS_DEFAULT_REGION"]},
        }


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _ENV.items():
            mp.setenv(key, value)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        # a developer's own profile or session token must not leak into (or break) the tests
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(key, raising=False)
        import s3fs

        fs = s3fs.S3FileSystem(
            key=_ENV["AWS_ACCESS_KEY_ID"],
            secret=_ENV["AWS_SECRET_ACCESS_KEY"],
            # no region_name here: s3fs would send it as a LocationConstraint, which us-east-1 must not have
            client_kwargs={"endpoint_url": endpoint},
            skip_instance_cache=True,
        )
        fs.mkdir(BUCKET)
        try:
            yield S3Endpoint(endpoint_url=endpoint, bucket=BUCKET)
        finally:
            server.stop()


@pytest.fixture(params=["local", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path) -> str:
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_url")


@pytest.fixture
def s3_url(s3_endpoint: S3Endpoint, request: pytest.FixtureRequest) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:60].strip("-")
    return s3_endpoint.url(f"{name}-{uuid.uuid4().hex[:8]}")
