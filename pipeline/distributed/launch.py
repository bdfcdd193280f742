"""The one choice the GPU assets make: train in the asset's process, or on N processes under torchrun.

``train(context, compute, spec, tracker)`` runs ``spec.train(tracker)`` in-process when the compute resource asks for
one process; for more it writes the spec to a file and runs

    python -m torch.distributed.run --standalone --nproc-per-node N -m pipeline.distributed.train_<stage> spec.json

through ``dagster.PipesSubprocessClient``: rank 0's progress lines arrive in the run log as they happen, its metrics
in the asset's MLflow run, and its train result and metadata come back when it ends. Either way the asset gets the
same train result (the model loaded from the spec's ``output_url``) and carries on exactly as in-process.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import dagster as dg

from ldm_core import storage
from ldm_core.tracking import Tracker
from pipeline.distributed.entry import RESULT_MESSAGE
from pipeline.distributed.specs import LdmTrainSpec, VaeTrainSpec, result_from_summary
from pipeline.resources import ComputeResource


def torchrun_command(stage: str, processes: int, spec_path: str | Path) -> list[str]:
    """The torchrun command line for one node (``--standalone``: a local rendezvous on a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", f"pipeline.distributed.train_{stage}", str(spec_path)]


def _for_processes(spec: VaeTrainSpec | LdmTrainSpec) -> VaeTrainSpec | LdmTrainSpec:
    """Each rank picks its own GPU (LOCAL_RANK): a device pinned to one GPU index becomes plain "cuda"."""
    trainer = dict(spec.training.get("trainer") or {})
    if str(trainer.get("device", "auto")).startswith("cuda:"):
        trainer["device"] = "cuda"
    return spec.model_copy(update={"training": {**spec.training, "trainer": trainer}})


def train(context: dg.AssetExecutionContext, compute: ComputeResource, spec: VaeTrainSpec | LdmTrainSpec,
          tracker: Tracker, **in_process: Any) -> tuple[Any, dict[str, Any]]:
    """(train result, metadata for the asset) — in-process or under torchrun, as ``compute`` says.

    in_process: extra arguments of ``spec.train`` when it runs here (e.g. a dataset the asset already holds).
    """
    processes = compute.process_count()
    if processes == 1:
        return spec.train(tracker, **in_process), {"processes": 1, "launcher": "in-process"}
    return _train_under_torchrun(context, compute, _for_processes(spec), processes)


def _train_under_torchrun(context: dg.AssetExecutionContext, compute: ComputeResource,
                          spec: VaeTrainSpec | LdmTrainSpec, processes: int) -> tuple[Any, dict[str, Any]]:
    # CPU threads per rank: torchrun would set 1; share the cores out instead unless the resource says otherwise
    threads = compute.threads or max(1, (os.cpu_count() or 1) // processes)
    with tempfile.TemporaryDirectory(prefix="ldm-spec-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec.to_json_file(spec_path)
        command = torchrun_command(spec.stage, processes, spec_path)
        context.log.info(f"training {spec.stage} on {processes} processes: {' '.join(command)}")
        invocation = dg.PipesSubprocessClient().run(context=context, command=command,
                                                    env={"OMP_NUM_THREADS": str(threads)})
    results = [m["result"] for m in invocation.get_custom_messages()
               if isinstance(m, dict) and m.get("type") == RESULT_MESSAGE]
    if not results:
        raise dg.Failure(f"torchrun finished but rank 0 reported no train result for {spec.stage}; see the run's "
                         "stdout/stderr")
    reported = {k: getattr(v, "value", v) for k, v in invocation.get_materialize_result().metadata.items()}
    result = result_from_summary(spec, results[-1], spec.load_model())
    storage.remove(spec.output_url, recursive=True)  # a hand-over, not an artifact: the asset saves its own copy
    return result, {**reported, "processes": processes, "launcher": "torchrun"}
