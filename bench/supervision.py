"""What supervising a run costs the pool child (issue 15), without Celery or Redis.

One warm sandbox per case, one run supervised by the worker's own code (warm.start,
WarmSandbox.spawn, Supervisor): a CPU hog limited to `max_cpu_percent = 25`, a CPU hog
without a limit, and an idle run (it sleeps). CPU is read from the kernel for this
process (the pool child's side: sampling, throttling, the channel) and for the zygote
with its runs; wall time is the run's. The target: the whole tree stays within the
plugin's CPU limit + 3 points.

Run: `python -m bench.supervision [--seconds 5]` (writes bench/results/sandbox_supervision.json).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import write_result
from bench.sandbox_cost import end_run, run_workspace
from pluginpool.pool.sandbox import supervisor, warm
from pluginpool.pool.sandbox.launcher import ZygoteLauncher
from pluginpool.pool.sandbox.runner import standalone_plan
from pluginpool.pool.sandbox.runtime.messages import Spawn
from pluginpool.pool.sandbox.supervisor import MB, Bounds, Supervisor
from pluginpool.tasks.spec import PluginSpec

CODE = Path(__file__).resolve().parent


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _tree_cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def _wakeups() -> int:
    """This process's context switches so far (each wake-up of the supervisor is one)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw


def supervise_one(function: str, payload: dict[str, Any], *, cpu_percent: int) -> dict[str, Any]:
    """One run of bench_plugins.<function>, supervised; CPU % of each side over its wall."""
    spec = PluginSpec.model_validate({
        "id": function, "name": function, "entrypoint": f"bench_plugins:{function}",
        "resource_limits": {"max_cpu_percent": cpu_percent, "timeout_ms": 60_000}})
    plan = standalone_plan(spec, code_paths=(str(CODE),),
                           warm_root=tempfile.mkdtemp(prefix="pp-bench-supervision-"))
    sandbox, _ = warm.start(ZygoteLauncher(code_paths=(str(CODE),)), plan,
                            storage=lambda request: {"ok": False})
    assert sandbox is not None, f"{function} did not set up"
    zygote = psutil.Process(sandbox.pid)
    try:
        workspace = run_workspace(sandbox)
        ours, theirs = socket.socketpair()
        before_self, before_tree, before_wakeups = _self_cpu(), _tree_cpu(zygote), _wakeups()
        started = time.perf_counter()
        forked = sandbox.spawn(Spawn(
            job_id="1", operation="run", payload=payload, attempt=1, workspace=workspace,
            cpu_backstop_s=120, max_memory_mb=256, max_storage_kb=1024), theirs)
        theirs.close()
        out = Supervisor(
            forked.pid, ours.fileno(),
            bounds=Bounds(timeout_s=60, max_memory_bytes=256 * MB,
                          max_storage_bytes=1 << 20, cpu_percent=cpu_percent),
            workspace=workspace, baseline_rss=forked.zygote_rss_bytes, storage=None,
            max_frame_bytes=2 << 20, reaper=sandbox.run_reaper(forked.pid)).run()
        wall_s = time.perf_counter() - started
        pool_s = _self_cpu() - before_self
        sandbox_s = _tree_cpu(zygote) - before_tree
        wakeups = _wakeups() - before_wakeups
        ours.close()
        end_run(sandbox, workspace)
        assert out.result is not None, f"{function}: {out.killed_for or out.exit}"
    finally:
        sandbox.retire("benchmark done")
        sandbox.finish()
        shutil.rmtree(plan.warm_root, ignore_errors=True)
    return {
        "plugin": function, "max_cpu_percent": cpu_percent, "wall_s": round(wall_s, 2),
        "run_cpu_percent": round(100 * sandbox_s / wall_s, 2),
        "pool_child_cpu_percent": round(100 * pool_s / wall_s, 2),
        "whole_tree_cpu_percent": round(100 * (pool_s + sandbox_s) / wall_s, 2),
        "supervisor_wakeups_per_s": round(wakeups / wall_s, 1),
        "throttle": getattr(supervisor, "throttle_mechanism",
                            lambda: "SIGSTOP/SIGCONT, 100 ms period")(),
    }


def measure(seconds: float) -> dict[str, Any]:
    return {"cases": [
        supervise_one("busy", {"seconds": seconds}, cpu_percent=25),
        supervise_one("busy", {"seconds": seconds}, cpu_percent=100),
        supervise_one("sleep", {"seconds": seconds}, cpu_percent=100),
    ]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    write_result("sandbox_supervision", {
        "benchmark": "CPU of the pool child while it supervises a throttled, a busy and an "
                     "idle run (issue 15)",
        "command": f"python -m bench.supervision --seconds {args.seconds}",
        **measure(args.seconds)})


if __name__ == "__main__":
    main()
