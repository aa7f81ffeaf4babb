"""Killing what a process leaves below it: shared by the zygote (a run's orphans, a setup's
processes) and its guardian (what a dead zygote's tree left). Imports nothing the zygote
has not imported already: every module a zygote holds costs each run's fork."""

from __future__ import annotations

import contextlib
import os
import signal

PR_SET_CHILD_SUBREAPER = 36
TEARDOWN_ALONE_S = 5
"""The longest a zygote's teardown runs alone (it sets SIGALRM to this when its pool child
is gone; the pool child's own bound, warm.CLOSE_WAIT_S, is the same)."""
TEARDOWN_GRACE_S = 2.0 * TEARDOWN_ALONE_S
"""How long a zygote whose pool child is gone may go on (its teardown) before it is killed,
by its guardian or by the owner records' sweep."""
KILL_ROUNDS = 8


def kill_children() -> None:
    """Kill and reap every child of this process, and those that killing them orphans to
    it (a subreaper's); a round per generation, up to KILL_ROUNDS."""
    try:
        os.waitpid(-1, os.WNOHANG)  # the common case, no child at all, costs one call
    except ChildProcessError:
        return
    for _round in range(KILL_ROUNDS):
        pids = children()
        if not pids:
            return
        kill_all(pids)


def children(pid: int | str = "self") -> list[int]:
    """A process's children (every thread's); this process's by default. A thread or the
    process that is gone meanwhile counts none."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(child) for child in f.read().split())
    return found


def kill_all(pids: list[int]) -> None:
    """SIGKILL each process and its group, then reap them."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
