"""The `ldm` command: `ldm demo`, `ldm ui`, `ldm sample`, `ldm export`, `ldm weights`, `ldm validate`.

Everything defaults to LDM_HOME (./.ldm): the Dagster instance, the MLflow database and artifacts, the storage root.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ldm_core import request_limits as limits
from ldm_core.request_limits import RequestRefused, check_request
from pipeline import settings

DAGSTER_YAML = """\
# Written by `ldm`: a local Dagster instance under LDM_HOME (SQLite storage).
telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 1   # one GPU-tagged step at a time (pool `gpu`) on a laptop
run_monitoring:
  enabled: true
  max_resume_run_attempts: 0
  free_slots_after_run_end_seconds: 60   # a killed run never frees its `gpu` slot itself
"""


def prepare_home() -> Path:
    """Create LDM_HOME with a Dagster instance in it and point the environment at it."""
    home = settings.ldm_home()
    dagster_home = settings.dagster_home()
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():
        (dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)
    os.environ["LDM_HOME"] = str(home)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    os.environ.setdefault("MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri())
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return home


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow(\..*)?")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*superseded.*")


# ---------------------------------------------------------------------------------------------------------------
# ldm demo
# ---------------------------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    _quiet()
    import dagster as dg

    from pipeline import run_configs
    from pipeline.config_bridge import ConfigValidationError
    from pipeline.definitions import get_training_job
    from pipeline.resources import MLflowResource
    from pipeline.validation import validate_run_config

    run_config = run_configs.load(args.config)
    try:
        validate_run_config(run_config, get_training_job())  # every section, before anything is created or started
    except ConfigValidationError as e:
        print(f"{args.config or 'demo'}: {e}\nnothing was run.", file=sys.stderr)
        return 2
    home = prepare_home()
    run_config.setdefault("loggers", {"console": {"config": {"log_level": "INFO"}}})
    print(f"LDM_HOME={home}\nrunning ldm_training_job with {args.config or 'demo'} (progress below)…", flush=True)
    t0 = time.time()
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(
            dg.reconstructable(get_training_job),
            instance=instance,
            run_config=run_config,
            tags={"ldm.trigger": "ldm demo"},
        )
        # no daemon runs the run-status sensors here (pipeline/mlflow_runs.py): end what the steps could not
        mlflow_config = ((run_config.get("resources") or {}).get("mlflow") or {}).get("config") or {}
        MLflowResource(**mlflow_config).end_dagster_run(result.run_id, "FINISHED" if result.success else "FAILED")
        failed_checks = [
            f"  check {e.check_name} on {e.asset_key.to_user_string()} failed: {e.description or ''}"
            for e in result.get_asset_check_evaluations()
            if not e.passed
        ]
        if not result.success:
            print(f"\nthe run failed (run id {result.run_id}); see the log above or `ldm ui`", file=sys.stderr)
            if failed_checks:
                print(
                    "\n".join(failed_checks) + "\n  (a blocking check stops every asset downstream of it)",
                    file=sys.stderr,
                )
            return 1
        print(summary(instance, result.run_id, time.time() - t0))
    return 0


def summary(instance: Any, run_id: str, seconds: float) -> str:
    import dagster as dg

    def md(key: str) -> dict[str, Any]:
        ev = instance.get_latest_materialization_event(dg.AssetKey(key))
        return {k: getattr(v, "value", v) for k, v in ev.asset_materialization.metadata.items()} if ev else {}

    ds, vae, store, ldm, rep = (
        md(k) for k in ("image_dataset", "vae_model", "latent_store", "ldm_model", "evaluation_report")
    )
    lines = [
        "",
        f"ldm_training_job finished in {seconds / 60:.1f} min (run {run_id[:8]})",
        f"  dataset        {ds.get('rows_total')} images ({ds.get('bad_total', 0)} bad inputs dropped)",
        f"  ldm-vae        {vae.get('vae_uri')} (alias candidate); val PSNR {_fmt(vae.get('val_psnr'))} dB",
        f"  latent store   {store.get('rows_total')} rows at {store.get('store_url')}",
        f"  ldm            {ldm.get('ldm_uri')} (alias candidate); final loss {_fmt(ldm.get('final_loss'))}",
    ]
    if ldm.get("backbone"):
        lines.append(f"                 denoiser {ldm['backbone']}")
    passed = bool(rep.get("gate_passed"))
    if rep:
        lines.append(
            f"  evaluation     gate {'PASSED' if passed else 'did not pass'}"
            f"{' → alias champion moved to ' + str(rep.get('ldm_uri')) if passed else ''}"
        )
        if not passed:  # the gate lists its failures first, then its notes
            reasons = rep.get("gate_reasons") or ["(no reason recorded)"]
            more = f" (+{len(reasons) - 1} more in the report)" if len(reasons) > 1 else ""
            lines.append(f"                 why: {reasons[0]}{more}")
        if rep.get("color_confusions"):
            lines.append(f"                 colours drawn wrong: {'; '.join(rep['color_confusions'][:3])}")
        for k in ("color_acc", "shape_acc", "position_acc", "psnr", "ssim", "fid", "lpips"):
            if k in rep and rep[k] is not None:
                lines.append(f"                 {k} = {_fmt(rep[k])}")
        lines.append(f"  report         {rep.get('report_html')}")
    # champion moves only when the gate passes: otherwise the model to look at is the candidate
    alias = "champion" if passed else "candidate"
    lines += [
        "",
        "Browse the result:",
        "  ldm ui        # Dagster at http://127.0.0.1:3000, MLflow at http://127.0.0.1:5000",
        f'  ldm sample --model models:/ldm@{alias} --prompt "a large red circle in the center" -n 8 -o grid.png',
    ]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------------------------
# ldm ui
# ---------------------------------------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, `kill`, a closed terminal
STOP_GRACE_SECONDS = 20  # how long a server may take to shut down on SIGINT before it is killed


def cmd_ui(args: argparse.Namespace) -> int:
    """Run the Dagster UI (``dagster dev``: webserver + daemon) and the MLflow UI until a stop signal, or until one of
    them exits by itself (then the other is stopped too and the exit status is 1)."""
    prepare_home()
    bin_dir = Path(sys.executable).parent
    workspace = Path("workspace.yaml")
    target = ["-w", str(workspace)] if workspace.exists() else ["-m", "pipeline.definitions"]
    dagster = [str(bin_dir / "dagster"), "dev", *target, "-h", args.host, "-p", str(args.dagster_port)]
    mlflow = [
        str(bin_dir / "mlflow"),
        "ui",
        "--backend-store-uri",
        settings.mlflow_tracking_uri(),
        "--default-artifact-root",
        settings.mlflow_artifact_location(),
        "--host",
        args.host,
        "--port",
        str(args.mlflow_port),
    ]
    stop_requested: list[int] = []

    def request_stop(signum: int, _frame: Any) -> None:
        stop_requested.append(signum)

    previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    servers: dict[str, subprocess.Popen] = {}
    try:
        # Each server leads a process group of its own, with the helpers it starts (dagster dev's webserver, daemon
        # and code server; MLflow's workers), so stopping the group stops them all, and a terminal's Ctrl-C reaches
        # them only through here, once.
        for name, cmd in (("Dagster", dagster), ("MLflow", mlflow)):
            if not stop_requested:
                servers[name] = subprocess.Popen(cmd, start_new_session=True)
        print(
            f"Dagster: http://{args.host}:{args.dagster_port}   MLflow: http://{args.host}:{args.mlflow_port}   "
            "(Ctrl-C stops both)",
            flush=True,
        )
        while not stop_requested and all(p.poll() is None for p in servers.values()):
            time.sleep(0.5)
    finally:
        exited = {name: p.returncode for name, p in servers.items() if p.poll() is not None}
        _stop_servers(servers.values())
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop_requested:
        return 0
    for name, code in exited.items():
        print(f"ldm ui: the {name} server exited (status {code}); stopped the other one", file=sys.stderr)
    return 1


def _stop_servers(servers: Any) -> None:
    """SIGINT to each server's process group, then SIGKILL to whatever of a group is left after the grace period."""
    servers = list(servers)
    for p in servers:
        _signal_group(p.pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for p in servers:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(p.pid, signal.SIGKILL)  # the leader if it hung, and helpers it left behind
        p.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # the whole group is gone already
        pass


# ---------------------------------------------------------------------------------------------------------------
# ldm sample
# ---------------------------------------------------------------------------------------------------------------


def _sample_request_error(args: argparse.Namespace) -> str | None:
    """One line when the request is beyond ldm_core.request_limits (the bounds the served model applies too)."""
    if not 1 <= args.n <= limits.MAX_ROWS:
        return f"-n must be in 1..{limits.MAX_ROWS}, got {args.n}"
    n = args.n
    try:
        check_request([args.prompt] * n, [args.seed + i for i in range(n)], [args.steps] * n, [args.guidance] * n)
    except RequestRefused as e:
        return str(e).replace(" of row 0", "")  # steps, guidance and prompt are the same for every row
    return None


def cmd_sample(args: argparse.Namespace) -> int:
    refused = _sample_request_error(args)  # the request's bounds first: a refused one costs no model load
    if refused:
        print(f"ldm sample: {refused}", file=sys.stderr)
        return 2
    prepare_home()
    _quiet()
    # a tracking server that does not answer should say so in seconds, not after MLflow's minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow
    import numpy as np
    import pandas as pd
    from PIL import Image

    from ldm_core.grids import make_grid, upscale_nearest
    from pipeline.registry import ModelLookupError, resolve_model_uri

    try:
        if args.model.startswith("models:"):
            resolve_model_uri(mlflow.MlflowClient(), args.model)  # a missing alias/version: one line, not a traceback
        model = mlflow.pyfunc.load_model(args.model)
    except ModelLookupError as e:
        print(f"ldm sample: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # runs:/…, a path, an artifact store that fails: what went wrong, in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"ldm sample: cannot load {args.model}: {first[:300]}", file=sys.stderr)
        return 2
    frame = pd.DataFrame({"prompt": [args.prompt] * args.n, "seed": list(range(args.seed, args.seed + args.n))})
    if args.steps is not None:
        frame["steps"] = args.steps
    if args.guidance is not None:
        frame["guidance"] = args.guidance
    images = np.asarray(model.predict(frame))
    grid = make_grid(images, ncols=args.cols)
    if args.scale > 1:
        grid = upscale_nearest(grid, args.scale)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out)
    print(f"{args.n} images of {images.shape[1]}×{images.shape[2]} for {args.prompt!r} from {args.model} → {out}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# ldm export
# ---------------------------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    """A registered model as a diffusers folder (ldm_core.interop.pipeline_export), with what diffusers will not
    reproduce said on stdout."""
    prepare_home()
    _quiet()
    import mlflow

    from ldm_core.interop.pipeline_export import check_output_dir, export_diffusers
    from pipeline.mlflow_models import download_text_to_image
    from pipeline.registry import ModelLookupError, resolve_model_uri
    from pipeline.tracking import temp_dir

    try:
        check_output_dir(args.output)  # before any download
        if args.model.startswith("models:"):
            resolve_model_uri(mlflow.MlflowClient(), args.model)
    except (ModelLookupError, FileExistsError) as e:
        print(f"ldm export: {e}", file=sys.stderr)
        return 2
    with temp_dir() as tmp:
        try:
            model = download_text_to_image(args.model, tmp)
        except Exception as e:  # runs:/…, a path, an artifact store that fails: what went wrong, in one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"ldm export: cannot load {args.model}: {first[:300]}", file=sys.stderr)
            return 2
        result = export_diffusers(model, args.output)
    print(
        f"{args.model} → {result.folder} ({result.pipeline_class} layout: {result.denoiser_dir}/, vae/, "
        f"text_encoder/, tokenizer/, scheduler/)"
    )
    print("diffusers will NOT reproduce this model's samples exactly where:")
    print("\n".join(f"  - {n}" for n in result.divergences))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# ldm weights, ldm validate
# ---------------------------------------------------------------------------------------------------------------


def cmd_weights(args: argparse.Namespace) -> int:
    from ldm_core.pretrained import status

    rows = status()
    width = max(len(r.name) for r in rows)
    for r in rows:
        print(f"{r.name.ljust(width)}  {'present' if r.present else 'MISSING'}  {r.path}  ({r.used_for})")
    if args.json:
        print(
            json.dumps(
                [{"name": r.name, "path": str(r.path), "present": r.present, "used_for": r.used_for} for r in rows],
                indent=2,
            )
        )
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    _quiet()
    from pipeline import run_configs
    from pipeline.definitions import get_training_job
    from pipeline.validation import validate_run_config

    job = get_training_job()
    ok = True
    for name in args.configs or list(run_configs.available()):
        try:
            validate_run_config(run_configs.load(name), job)
            print(f"ok      {name}")
        except Exception as e:  # report every config, then fail
            ok = False
            print(f"INVALID {name}: {e}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ldm", description="ldm-pipeline: train latent diffusion models with Dagster + MLflow."
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="materialize ldm_training_job on the embedded default (demo.yaml)")
    d.add_argument("--config", default=None, help="run config path or preset name (default: demo)")
    d.set_defaults(fn=cmd_demo)

    u = sub.add_parser("ui", help="start the Dagster UI and the MLflow UI on 127.0.0.1")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--dagster-port", type=int, default=3000)
    u.add_argument("--mlflow-port", type=int, default=5000)
    u.set_defaults(fn=cmd_ui)

    s = sub.add_parser("sample", help="generate an image grid from a registered model")
    s.add_argument("--model", default="models:/ldm@champion", help="MLflow model URI")
    s.add_argument("--prompt", required=True, help=f"at most {limits.MAX_PROMPT_CHARS} characters")
    s.add_argument("-n", type=int, default=8, help=f"images, 1..{limits.MAX_ROWS} (seeds --seed, --seed+1, …)")
    s.add_argument("-o", "--output", default="grid.png")
    s.add_argument("--seed", type=int, default=0, help=f"first seed, 0..{limits.MAX_SEED}")
    s.add_argument(
        "--steps", type=int, default=None, help=f"sampler steps, 1..{limits.MAX_STEPS} (default: the model's)"
    )
    s.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"classifier-free guidance scale, finite, 0..{limits.MAX_GUIDANCE:g} (default: the model's)",
    )
    s.add_argument("--cols", type=int, default=None)
    s.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscale of the grid (small images)")
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("export", help="write a registered model as a diffusers folder (model_index.json)")
    e.add_argument("--model", default="models:/ldm@champion", help="MLflow model URI")
    e.add_argument("-o", "--output", required=True, help="new or empty directory")
    e.set_defaults(fn=cmd_export)

    w = sub.add_parser("weights", help="list pretrained components, where they are expected, and whether present")
    w.add_argument("--json", action="store_true")
    w.set_defaults(fn=cmd_weights)

    v = sub.add_parser("validate", help="validate run configs (default: every preset in pipeline/configs)")
    v.add_argument("configs", nargs="*")
    v.set_defaults(fn=cmd_validate)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
