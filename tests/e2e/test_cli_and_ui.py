"""The ways people start the pipeline: `dagster job execute`, the webserver's GraphQL API (what the UI's
Materialize button sends), and `ldm sample` on the registry."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from benchmarks.faults.dagster_trial import fresh_home
from tests.common import TINY, answers, free_port, load_tiny_config, wait_for
from tests.e2e.helpers import ASSETS, ROOT, child_env, dagster_job_execute, execute

BIN = Path(sys.executable).parent


def test_dagster_job_execute_runs_the_pipeline(tmp_path):
    home = fresh_home(tmp_path / "home")
    out = dagster_job_execute(home, TINY)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "RUN_SUCCESS" in out.stdout + out.stderr
    assert list((home / "storage" / "reports").glob("*/report.html"))


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        body = json.loads(r.read())
    assert "errors" not in body, body
    return body["data"]


LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""


def test_webserver_lists_assets_and_materializes_them(tmp_path):
    """`dagster dev` (webserver + daemon, what `ldm ui` starts) on 127.0.0.1; the daemon dequeues the run."""
    home = fresh_home(tmp_path / "home")
    port = free_port()
    log = open(tmp_path / "dagster-dev.log", "wb")
    server = subprocess.Popen(
        [str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT,
        env=child_env(home),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(
            "webserver",
            lambda: answers(f"http://127.0.0.1:{port}/server_info"),
            180,
            server,
            tmp_path / "dagster-dev.log",
        )
        # wait for the code location to load, then list the assets
        for _ in range(120):
            nodes = _graphql(port, "{ assetNodes { assetKey { path } groupName } }")["assetNodes"]
            if nodes:
                break
            time.sleep(1)
        assert {n["assetKey"]["path"][0]: n["groupName"] for n in nodes} == {k: "ldm" for k in ASSETS}

        params = {
            "selector": {
                "repositoryLocationName": "ldm_pipeline",
                "repositoryName": "__repository__",
                "jobName": "__ASSET_JOB",
                "assetSelection": [{"path": [k]} for k in ASSETS],
            },
            "runConfigData": load_tiny_config(),
            "mode": "default",
        }
        launched = _graphql(port, LAUNCH, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        status = None
        deadline = time.time() + 400
        while time.time() < deadline:
            status = _graphql(
                port, "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }", {"id": run_id}
            )["runOrError"]["status"]
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                break
            time.sleep(2)
        assert status == "SUCCESS", (tmp_path / "dagster-dev.log").read_text()[-3000:]
        query = "{ assetNodes { assetKey { path } assetMaterializations(limit: 1) { runId } } }"
        mats = _graphql(port, query)["assetNodes"]
        assert all(n["assetMaterializations"] and n["assetMaterializations"][0]["runId"] == run_id for n in mats)
    finally:
        import os
        import signal

        os.killpg(server.pid, signal.SIGINT)  # dagster dev shuts its webserver and daemon down on SIGINT
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def test_ldm_sample_from_the_registry(materialized_home):
    """Every tile of the grid holds an image, not the grid's white padding (4 samples, one row, no upscaling)."""
    home, out_png = materialized_home
    import numpy as np
    from PIL import Image

    grid = np.asarray(Image.open(out_png).convert("RGB")).astype(float)
    pad, side = 2, 32
    assert grid.shape == (side + 2 * pad, 4 * (side + pad) + pad, 3)
    tiles = [grid[pad : pad + side, pad + i * (side + pad) : pad + i * (side + pad) + side] for i in range(4)]
    for tile in tiles:
        assert tile.std() > 5 and (tile < 250).mean() > 0.5  # content, not padding
    assert not np.array_equal(tiles[0], tiles[1])  # different seeds, different images


def _sample(home: Path, model: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(BIN / "ldm"),
            "sample",
            "--model",
            model,
            "--prompt",
            "a small red circle",
            "-n",
            "1",
            "-o",
            str(home / "x.png"),
        ],
        env={**child_env(home), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "model, expected",
    [
        ("models:/ldm@nonexistent", "no alias 'nonexistent'; ldm has versions"),
        ("models:/ldm/999", "no version 999; ldm has versions"),
        ("models:/nothere@champion", "no registered model 'nothere' (registered: "),
        ("models:/ldm", "is not a registered-model URI"),
    ],
)
def test_ldm_sample_with_a_model_that_is_not_there_says_so_in_one_line(materialized_home, model, expected):
    home, _ = materialized_home
    out = _sample(home, model)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in out.stderr, out.stderr[-2000:]
    if "ldm has versions" in expected:
        assert "champion → " in lines[0] and "candidate → " in lines[0]


def test_ldm_sample_with_an_unreachable_tracking_store_says_so_in_one_line(tmp_path):
    with socket.socket() as held:  # bound, never listening: connections are refused, and no other test can take it
        held.bind(("127.0.0.1", 0))
        out = _sample(
            fresh_home(tmp_path / "home"),
            "models:/ldm@champion",
            MLFLOW_TRACKING_URI=f"http://127.0.0.1:{held.getsockname()[1]}",
        )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the MLflow tracking store" in lines[0], out.stderr[-2000:]


@pytest.fixture(scope="module")
def materialized_home(ldm_home, tiny_config):
    """Run the pipeline (in-process) in the session home if the e2e module has not, then `ldm sample`."""
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().get_model_version_by_alias("ldm", "champion")
    except Exception:
        assert execute(tiny_config).success
    out_png = ldm_home / "grid.png"
    cmd = [
        str(BIN / "ldm"),
        "sample",
        "--model",
        "models:/ldm@champion",
        "--prompt",
        "a small red circle",
        "-n",
        "4",
        "--steps",
        "2",
        "--scale",
        "1",
        "--cols",
        "4",
        "-o",
        str(out_png),
    ]
    out = subprocess.run(cmd, env=child_env(ldm_home), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return ldm_home, out_png


# ---------------------------------------------------------------------------------------------------------------
# `ldm ui` stops what it starts
# ---------------------------------------------------------------------------------------------------------------


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every running process on this (Linux) machine (zombies are done)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, …
        except OSError:
            continue  # exited meanwhile
        if fields[0] != "Z":
            out[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))
    return out


def _alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running, or any process left in their process groups."""
    return {pid for pid, (_, pgrp) in _processes().items() if pid in pids or pgrp in pids}


@pytest.fixture
def ldm_ui(tmp_path):
    """`ldm ui` on two free ports in a fresh LDM_HOME, once both servers have started processes of their own (dagster
    dev its webserver and daemon, MLflow its web server: what a stop must reach too); yields (process, {child pid},
    log)."""
    home = fresh_home(tmp_path / "home")
    ports = free_port(), free_port()
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        ui = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "ui",
                "--dagster-port",
                str(ports[0]),
                "--mlflow-port",
                str(ports[1]),
            ],
            cwd=ROOT,
            env=child_env(home),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while True:
            procs = _processes()
            children = {pid for pid, (ppid, _) in procs.items() if ppid == ui.pid}
            if len(children) == 2 and children <= {ppid for ppid, _ in procs.values()}:
                break
            assert ui.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield ui, children, log
    finally:
        for pgid in {ui.pid, *children}:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ui.wait()


def _gone(pids: set[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _alive(pids)


@pytest.mark.slow
def test_ldm_ui_stops_both_servers_on_sigterm(ldm_ui):
    """SIGTERM (and SIGHUP, the same handler) stops both servers and what they started, as Ctrl-C does."""
    ui, children, log = ldm_ui
    ui.send_signal(signal.SIGTERM)
    assert ui.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert _gone(children, 5), f"left running after SIGTERM: {_alive(children)}"


@pytest.mark.slow
def test_ldm_ui_exits_non_zero_and_stops_the_other_server_when_one_dies(ldm_ui):
    ui, children, log = ldm_ui
    mlflow = next(pid for pid in children if b"mlflow" in Path(f"/proc/{pid}/cmdline").read_bytes())
    os.kill(mlflow, signal.SIGKILL)
    assert ui.wait(timeout=60) == 1, log.read_text()[-3000:]
    assert "the MLflow server exited" in log.read_text()
    assert _gone(children, 5), f"left running: {_alive(children)}"
