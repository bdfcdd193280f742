"""Security: no weight load can execute code (safetensors, or torch.load with weights_only=True; no pickle), the
servers the project starts listen on 127.0.0.1 unless told otherwise, and S3 credentials never reach MLflow,
Dagster's event log or the logs."""

import ast
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.common import ROOT, load_tiny_config

SCANNED = ("ldm_core", "pipeline", "benchmarks")


# ---------------------------------------------------------------------------------------------------------------
# Loading never unpickles
# ---------------------------------------------------------------------------------------------------------------

PICKLERS = ("pickle", "dill", "cloudpickle", "joblib")


def _call_name(node: ast.Call) -> str:
    parts, f = [], node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def unsafe_loads(source: str, filename: str) -> list[str]:
    """Calls that can unpickle: torch.load without weights_only=True, pickle/dill/cloudpickle/joblib loads,
    numpy loads with allow_pickle=True, and imports of the pickle family."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            )
            bad = [n for n in names if n.split(".")[0] in (*PICKLERS, "cPickle", "shelve")]
            if bad:
                found.append(f"{filename}:{node.lineno} imports {bad[0]}")
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        kwargs = {k.arg: k.value for k in node.keywords}
        if name == "torch.load" or name.endswith(".torch.load"):
            wo = kwargs.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{filename}:{node.lineno} torch.load without weights_only=True")
        elif name.split(".")[-1] in ("load", "loads") and name.split(".")[0] in PICKLERS:
            found.append(f"{filename}:{node.lineno} {name}")
        elif name.split(".")[-1] in ("load", "loadtxt") and name.split(".")[0] in ("np", "numpy"):
            ap = kwargs.get("allow_pickle")
            if isinstance(ap, ast.Constant) and ap.value is True:
                found.append(f"{filename}:{node.lineno} {name}(allow_pickle=True)")
    return found


def test_the_scanner_finds_unsafe_loads():
    code = (
        "import torch, pickle\nimport numpy as np\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
        "torch.load('x', weights_only=True)\npickle.loads(b'')\nnp.load('x', allow_pickle=True)\nnp.load('x')\n"
    )
    found = unsafe_loads(code, "t.py")
    assert [f.split(" ", 1)[1] for f in found] == [
        "imports pickle",
        "torch.load without weights_only=True",
        "torch.load without weights_only=True",
        "pickle.loads",
        "np.load(allow_pickle=True)",
    ]


def test_no_code_path_can_unpickle_weights():
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 40
    found = [f for p in files for f in unsafe_loads(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []
    # and the loads that exist are the safe ones: safetensors everywhere, torch.load only with weights_only
    text = "\n".join(p.read_text() for p in files)
    assert "safetensors" in text and "weights_only=True" in text


# ---------------------------------------------------------------------------------------------------------------
# Servers bind to 127.0.0.1
# ---------------------------------------------------------------------------------------------------------------


class _FakeProc:
    """A server that runs until `ldm ui` stops it."""

    pid, returncode = -1, None

    def __init__(self, cmd, *a, **k):
        _FakeProc.started.append(cmd)

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        self.returncode = 0
        return 0


def _ui_commands(monkeypatch, tmp_path, *argv):
    from pipeline import cli

    monkeypatch.setenv("LDM_HOME", str(tmp_path / "home"))
    for var in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    _FakeProc.started = []
    monkeypatch.setattr(cli.subprocess, "Popen", _FakeProc)
    monkeypatch.setattr(cli, "_signal_group", lambda pgid, sig: None)  # no real process group behind the fakes
    # the user presses Ctrl-C while `ldm ui` waits on its servers
    monkeypatch.setattr(cli.time, "sleep", lambda s: signal.raise_signal(signal.SIGINT))
    assert cli.main(["ui", *argv]) == 0
    return {Path(cmd[0]).name: cmd for cmd in _FakeProc.started}


def _arg(cmd, *flags):
    for i, a in enumerate(cmd):
        if a in flags:
            return cmd[i + 1]
    raise AssertionError(f"none of {flags} in {cmd}")


def test_ldm_ui_binds_to_loopback_unless_told_otherwise(monkeypatch, tmp_path):
    cmds = _ui_commands(monkeypatch, tmp_path)
    assert set(cmds) == {"dagster", "mlflow"}
    assert _arg(cmds["dagster"], "-h", "--host") == "127.0.0.1"
    assert _arg(cmds["mlflow"], "--host", "-h") == "127.0.0.1"
    cmds = _ui_commands(monkeypatch, tmp_path, "--host", "0.0.0.0", "--dagster-port", "3100", "--mlflow-port", "5100")
    assert _arg(cmds["dagster"], "-h", "--host") == "0.0.0.0" and _arg(cmds["dagster"], "-p", "--port") == "3100"
    assert _arg(cmds["mlflow"], "--host", "-h") == "0.0.0.0" and _arg(cmds["mlflow"], "--port", "-p") == "5100"


# ---------------------------------------------------------------------------------------------------------------
# Credentials never leak
# ---------------------------------------------------------------------------------------------------------------

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIALDMFAULTCAMPAIGN7",
    "AWS_SECRET_ACCESS_KEY": "ldmSecretKeyDoNotLeak+9f8e7d6c5b4a",
    "AWS_SESSION_TOKEN": "ldmSessionTokenDoNotLeak/1a2b3c4d5e",
}


def _files_containing(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits += [f"{p} contains {n.decode()[:12]}…" for n in needles if n in data]
    return hits


@pytest.mark.slow
def test_s3_credentials_never_reach_mlflow_dagster_or_the_logs(s3_endpoint, tmp_path, monkeypatch, capfd, caplog):
    import logging

    import dagster as dg
    import s3fs

    from benchmarks.faults.dagster_trial import fresh_home
    from benchmarks.faults.s3proxy import FaultProxy
    from pipeline.definitions import defs

    home = fresh_home(tmp_path / "home")
    storage_root = s3_endpoint.url(f"secrets-{tmp_path.name}")
    with FaultProxy(s3_endpoint.endpoint_url) as proxy:  # no faults: it only shows which credentials signed
        for k, v in {
            **SECRETS,
            "AWS_ENDPOINT_URL": proxy.url,
            "LDM_HOME": str(home),
            "LDM_STORAGE_ROOT": storage_root,
            "DAGSTER_HOME": str(home / "dagster"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        }.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("LDM_MLFLOW_ARTIFACTS", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # the next clients read the planted credentials
        config = load_tiny_config()
        with caplog.at_level(logging.DEBUG), dg.DagsterInstance.get() as instance:
            result = defs.resolve_job_def("ldm_training_job").execute_in_process(run_config=config, instance=instance)
        s3fs.S3FileSystem.clear_instance_cache()
        assert result.success
        assert SECRETS["AWS_ACCESS_KEY_ID"] in proxy.access_keys, "the planted credentials were not used"
    out, err = capfd.readouterr()

    needles = [v.encode() for v in SECRETS.values()]
    # MLflow: params, tags, metrics (the SQLite store) and the logged artifacts
    con = sqlite3.connect(home / "mlflow.db")
    params = con.execute("select key, value from params").fetchall()
    tags = con.execute("select key, value from tags").fetchall()
    con.close()
    assert params and tags
    leaks = [f"mlflow {kv}" for kv in params + tags if any(s in f"{kv[0]}={kv[1]}" for s in SECRETS.values())]
    # the files: MLflow's database and artifacts, Dagster's instance (event log, run storage, compute logs)
    leaks += _files_containing(home, needles)
    # the run's own event log and metadata, the process output and every log record
    events = "\n".join(str(e) for e in result.all_events)
    # Log records at INFO and above (what the pipeline and its libraries log unless asked for more). At DEBUG,
    # botocore itself logs each signed request (the Authorization header and the session token): an AWS SDK
    # behaviour, confined to its own loggers, which nothing here turns on.
    logs = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    debug_leaks = {
        r.name.split(".")[0]
        for r in caplog.records
        if r.levelno < logging.INFO and any(s in r.getMessage() for s in SECRETS.values())
    }
    assert debug_leaks <= {"botocore", "aiobotocore"}, debug_leaks
    leaks += [
        f"{where} contains {name}"
        for where, text in (("events", events), ("stdout", out), ("stderr", err), ("log records", logs))
        for name, s in SECRETS.items()
        if s in text
    ]
    # and the objects the pipeline wrote to S3 (manifests, metadata, reports)
    from ldm_core import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint.endpoint_url)
    objects = list(storage.walk_files(storage_root))
    assert len(objects) > 20
    for rel in objects:
        if rel.endswith((".json", ".jsonl", ".html", ".md")):
            text = storage.read_text(storage.join(storage_root, rel))
            leaks += [f"s3 {rel} contains {name}" for name, s in SECRETS.items() if s in text]
    assert leaks == []
