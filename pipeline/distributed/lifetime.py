"""Training processes that die with the step that started them, never outliving it as orphans.

A step process that is killed outright (SIGKILL: an OOM kill, the end of a pod's grace period, an operator) runs no
cleanup, so whatever it started must be tied to it by the kernel. torchrun's ranks would otherwise keep training,
and a retry of the step would train beside them on the same checkpoint directory. The tree is

    step process --Popen, own session--> torchrun agent --Popen, own session (torchrun's choice)--> rank 0..N-1

and each link carries a parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG)``): the agent is started through
``python -m pipeline.distributed.lifetime STEP_PID -- torchrun …``, which sets SIGKILL as its parent-death signal and
then execs torchrun (the setting survives exec, and the pid stays the same); each rank sets the same at its start
(`rank_dies_with_agent`, from the agent's pid the wrapper leaves in ``LDM_TORCHRUN_AGENT_PID``). The kernel sends it
when the parent dies; a parent that died before the child's prctl ran is caught by comparing ``getppid()`` with
the expected parent afterwards. The agent's own session lets the launcher signal and kill its process group.

A parent-death signal fires when the *thread* that forked the child ends: the launcher waits for torchrun in the
thread that started it, so the two end together. Elsewhere than Linux there is no such signal, and these are no-ops.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
AGENT_PID_ENV = "LDM_TORCHRUN_AGENT_PID"
"""Set by the wrapper for torchrun's ranks: the agent's pid, the parent each rank must have."""


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; False where there is no such thing."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    return True


def die_with_parent(expected_parent: int, sig: int = signal.SIGKILL) -> None:
    """Die with ``sig`` when the parent dies, and now if it already has (we were reparented before prctl ran)."""
    if set_parent_death_signal(sig) and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)


def rank_dies_with_agent() -> None:
    """For a torchrun rank started through `tied_command`: die with the agent (a no-op in any other launch)."""
    agent = os.environ.get(AGENT_PID_ENV)
    if agent:
        die_with_parent(int(agent))


def tied_command(command: list[str], parent: int | None = None) -> list[str]:
    """``command`` (torchrun) run so that it dies with ``parent`` (default: this process)."""
    return [sys.executable, "-m", "pipeline.distributed.lifetime", str(parent or os.getpid()), "--", *command]


def main(argv: list[str]) -> None:
    """``python -m pipeline.distributed.lifetime PARENT_PID -- COMMAND…``: exec COMMAND, tied to PARENT_PID."""
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m pipeline.distributed.lifetime PARENT_PID -- COMMAND [ARGS…]")
    die_with_parent(int(argv[0]))
    os.environ[AGENT_PID_ENV] = str(os.getpid())  # exec keeps the pid: the ranks' parent is this very process
    os.execv(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
