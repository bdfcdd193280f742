"""The torchrun command line of one node: standalone for a single node, or one agent of a c10d rendezvous.

A training of M nodes × N processes is M torchrun agents, one per node, each starting N ranks. With one node the
agent runs ``--standalone`` (a rendezvous of its own on a free local port). With more, every agent is started with
the same ``--nnodes=M --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=ID``: one of them hosts the c10d
store at HOST:PORT (``is_host``), the others connect to it, and once all M have joined they agree on the global ranks
and start their ranks together. torch orders the agents by their address (``--local-addr``, then pid): the agent
with the smallest address holds global ranks 0..N-1, which is why each node passes an address that sorts as its
index (pod 0 of a Kubernetes Job: ``<job>-0.<service>``), so that rank 0, the one that reports to Dagster, runs on
node 0.

A worker that fails ends its agent's whole local group (``--max-restarts=0``: a retry of the Dagster step is the
restart, from the last checkpoint); the other nodes' ranks then fail at their next collective, on the broken
connection or, for a rank that hangs without closing it, after the collective timeout.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Rendezvous:
    """Where the agents of a multi-node training meet (torchrun's c10d rendezvous)."""

    nodes: int
    """How many agents (nodes) must join before training starts."""
    endpoint: str
    """HOST:PORT of the c10d store: node 0's address."""
    run_id: str
    """Unique per launch: agents of another launch on the same endpoint never join this one."""
    local_addr: str | None = None
    """This node's address, as the other nodes reach it (also the order of the nodes' ranks); None: its FQDN."""
    is_host: bool | None = None
    """Whether this agent hosts the store; None: torch decides (the agent whose address is the endpoint's host)."""

    def args(self) -> list[str]:
        args = [
            f"--nnodes={self.nodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id}",
        ]
        if self.is_host is not None:
            args.append(f"--rdzv-conf=is_host={int(self.is_host)}")
        if self.local_addr:
            args.append(f"--local-addr={self.local_addr}")
        return args


def torchrun_command(
    stage: str,
    processes: int,
    spec_path: str | Path,
    grace_s: int = 30,
    rendezvous: Rendezvous | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The torchrun command line for one node: ``processes`` ranks of ``pipeline.distributed.train_<stage>`` on
    ``spec_path``; standalone without ``rendezvous``. On a stop signal the agent gives its ranks ``grace_s`` to
    checkpoint and exit before it kills them."""
    nodes = ["--standalone"] if rendezvous is None else [*rendezvous.args(), "--max-restarts=0"]
    return [
        python,
        "-m",
        "torch.distributed.run",
        *nodes,
        f"--nproc-per-node={processes}",
        f"--shutdown-timeout={grace_s}",
        "-m",
        f"pipeline.distributed.train_{stage}",
        str(spec_path),
    ]
