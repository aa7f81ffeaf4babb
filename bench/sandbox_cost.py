"""The CPU one sandboxed run costs, on every side of the boundary, without Celery or Redis.

One warm sandbox of the no-op plugin, N runs through the same code the worker uses
(warm.start, WarmSandbox.spawn, Supervisor, outcome.usage_of). CPU is read from the kernel:
this process (the pool child's side), the zygote, and the runs (reaped by the zygote, so
in its children's times). The plugin's own CPU (`usage.cpu_ms`) is reported beside it.
"""

from __future__ import annotations

import _socket
import dataclasses
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from pluginpool.pool.sandbox import outcome, warm
from pluginpool.pool.sandbox.launcher import ZygoteLauncher
from pluginpool.pool.sandbox.runner import standalone_plan
from pluginpool.pool.sandbox.runtime.limits import MB
from pluginpool.pool.sandbox.runtime.messages import Spawn
from pluginpool.pool.sandbox.supervisor import Bounds, Supervision, Supervisor
from pluginpool.tasks.spec import PluginSpec


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _self_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _zygote_faults(pid: int) -> tuple[int, int]:
    """(the zygote's own minor faults, those of its reaped children: the runs)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[8])


def run_workspace(sandbox: warm.WarmSandbox) -> str:
    """The sandbox's one run workspace; a new directory per run for older code (a baseline
    measured with BENCH_BASELINE_CODE)."""
    return getattr(sandbox, "workspace", "") or tempfile.mkdtemp(prefix="run-",
                                                                 dir=sandbox.home)


def end_run(sandbox: warm.WarmSandbox, workspace: str, out: Supervision | None = None) -> None:
    """As the worker does after a run: the workspace emptied (or removed); with the run's
    Supervision, not listed again if the supervisor found it empty (runner._run_once)."""
    if workspace == getattr(sandbox, "workspace", None):
        cleaned = (sandbox.clean_workspace(found_empty=out.workspace_empty)
                   if hasattr(out, "workspace_empty") else sandbox.clean_workspace())
        assert cleaned, "the run workspace could not be emptied"
    else:
        shutil.rmtree(workspace, ignore_errors=True)


def supervised(sandbox: warm.WarmSandbox, spawn: Spawn, ours: _socket.socket,
               theirs: _socket.socket, bounds: Bounds) -> tuple[Supervision, int, int]:
    """One run handed over and supervised as runner._run_once does (its Forked read by the
    supervisor when needed; older code, measured as a baseline: awaited first)."""
    if not hasattr(sandbox, "start_run"):
        forked = sandbox.spawn(spawn, theirs)  # type: ignore[arg-type]  # older code
        theirs.close()
        return Supervisor(
            forked.pid, ours.fileno(), bounds=bounds, workspace=spawn.workspace,
            baseline_rss=forked.zygote_rss_bytes, storage=None, max_frame_bytes=2 << 20,
            reaper=sandbox.run_reaper(forked.pid)).run(), forked.pid, forked.zygote_rss_bytes
    pending = sandbox.start_run(spawn, theirs)
    theirs.close()
    extra = {"output": sandbox.output} if hasattr(sandbox, "output") else {}  # older code
    out = Supervisor(None, ours.fileno(), bounds=bounds, workspace=spawn.workspace,
                     baseline_rss=0, storage=None, max_frame_bytes=2 << 20, reaper=pending,
                     pending=pending, **extra).run()
    return out, pending.pid or 0, pending.zygote_rss_bytes


def _tree_cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def measure(code_path: Path, runs: int, *, runtime_dir: str | None = None) -> dict[str, Any]:
    """Per-run CPU (ms) of the pool child's side, the zygote, the run, and the plugin
    (`runtime_dir`: the zygote runs another copy of pool/sandbox/runtime, for an A/B)."""
    spec = PluginSpec(id="noop", name="noop", entrypoint="bench_plugins:noop")
    limits = spec.resource_limits
    plan = standalone_plan(spec, code_paths=(str(code_path),),
                           warm_root=tempfile.mkdtemp(prefix="pp-bench-warm-"))
    launcher = ZygoteLauncher(code_paths=(str(code_path),))
    if runtime_dir is not None:
        launcher = dataclasses.replace(launcher, runtime_dir=runtime_dir)
    sandbox, _ = warm.start(launcher, plan, storage=lambda request: {"ok": False})
    assert sandbox is not None, "the no-op plugin did not set up"
    zygote = psutil.Process(sandbox.pid)
    plugin_ms: list[float] = []
    try:
        before_self, before_zygote = _self_cpu(), _tree_cpu(zygote)
        faults_self, (faults_zygote, faults_runs) = _self_faults(), _zygote_faults(sandbox.pid)
        first = zygote.cpu_times()
        before_own = first.user + first.system
        started = time.perf_counter()
        for n in range(runs):
            workspace = run_workspace(sandbox)
            ours, theirs = _socket.socketpair()  # as runner._run_once
            # The limits the worker's runner sends for this spec (runner._run_once).
            spawn = Spawn(
                job_id=str(n), operation="run", payload={"i": n}, attempt=1,
                workspace=workspace, cpu_backstop_s=spec.deadlines.cpu_backstop_s,
                max_memory_mb=limits.max_memory_mb, max_storage_kb=limits.max_storage_kb)
            bounds = Bounds(timeout_s=spec.deadlines.run_kill_s,
                            max_memory_bytes=limits.max_memory_mb * MB,
                            max_storage_bytes=limits.max_storage_kb * 1024,
                            cpu_percent=limits.max_cpu_percent)
            out, pid, baseline = supervised(sandbox, spawn, ours, theirs, bounds)
            usage = outcome.usage_of(out, baseline_rss=baseline, sandbox=sandbox,
                                     run_pid=pid, setup=None)
            plugin_ms.append(usage.cpu_ms)
            ours.close()
            end_run(sandbox, workspace, out)
        wall_s = time.perf_counter() - started
        after_zygote, after_runs = _zygote_faults(sandbox.pid)
        faults = {"pool_child_side": round((_self_faults() - faults_self) / runs, 1),
                  "zygote": round((after_zygote - faults_zygote) / runs, 1),
                  "run_process": round((after_runs - faults_runs) / runs, 1)}
        faults["total"] = round(sum(faults.values()), 1)
        pool_side = (_self_cpu() - before_self) * 1000 / runs
        sandbox_side = (_tree_cpu(zygote) - before_zygote) * 1000 / runs
        own = zygote.cpu_times()
        zygote_own = (own.user + own.system - before_own) * 1000 / runs
        rss = zygote.memory_full_info()
    finally:
        sandbox.retire("benchmark done")
        sandbox.finish()
        shutil.rmtree(plan.warm_root, ignore_errors=True)
    plugin = statistics.mean(plugin_ms)
    return {
        "runs": runs,
        "runs_per_s_one_process": round(runs / wall_s, 1),
        "cpu_ms_per_run": {
            "pool_child_side": round(pool_side, 3),
            "zygote": round(zygote_own, 3),
            "run_process": round(sandbox_side - zygote_own, 3),
            "total": round(pool_side + sandbox_side, 3),
            "plugin_code_as_reported": round(plugin, 3),
            "sandbox_cost": round(pool_side + sandbox_side - plugin, 3),
        },
        "minor_faults_per_run": faults,
        "zygote_rss_mb": round(rss.rss / MB, 2),
        "zygote_uss_mb": round(rss.uss / MB, 2),
    }


FIGURES = ("pool_child_side", "zygote", "run_process", "total")


def compare(variants: dict[str, str], *, runs: int, rounds: int) -> dict[str, Any]:
    """Zygote runtimes side by side (name → a copy of pool/sandbox/runtime; this process's
    side is this tree's), rounds alternating, the order flipped every round. CPU figures
    here swing by 20 % or more with the machine's load: compare the paired differences
    (each round against the first variant's in the same round) and the faults."""
    names = list(variants)
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for n in range(rounds):
        for name in names if n % 2 == 0 else names[::-1]:
            found[name].append(measure(Path(__file__).resolve().parent, runs,
                                       runtime_dir=os.path.abspath(variants[name])))
    first = found[names[0]]
    report: dict[str, Any] = {"runs": runs, "rounds": rounds}
    for name, rows in found.items():
        cpu = [row["cpu_ms_per_run"] for row in rows]
        report[name] = {
            "runtime_dir": variants[name],
            "cpu_ms_median": {f: round(statistics.median(c[f] for c in cpu), 3) for f in FIGURES},
            "cpu_ms_min": {f: round(min(c[f] for c in cpu), 3) for f in FIGURES},
            "cpu_ms_paired_difference_median": {f: round(statistics.median(
                c[f] - base["cpu_ms_per_run"][f] for c, base in zip(cpu, first, strict=True)),
                3) for f in FIGURES},
            "minor_faults_median": {f: round(statistics.median(
                row["minor_faults_per_run"][f] for row in rows), 1)
                for f in ("zygote", "run_process", "total")},
            "zygote_rss_mb": rows[0]["zygote_rss_mb"]}
    return report


def main() -> None:
    """`python -m bench.sandbox_cost [runs]`: the per-run figures alone, printed; with
    `--ab NAME=DIR ...`, runtimes compared (see compare)."""
    import argparse
    import json
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=int, nargs="?", default=500)
    parser.add_argument("--ab", action="append", default=[], metavar="NAME=DIR",
                        help="a copy of pool/sandbox/runtime to compare (two or more)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of an --ab comparison")
    args = parser.parse_args()
    if args.ab:
        variants = dict(entry.split("=", 1) for entry in args.ab)
        print(json.dumps(compare(variants, runs=args.runs, rounds=args.rounds), indent=2))
    else:
        print(json.dumps(measure(Path(__file__).resolve().parent, args.runs), indent=2))


def zygotes_under(warm_root: str) -> list[psutil.Process]:
    """The zygotes whose home is under `warm_root` (they are detached from the worker)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.cwd().startswith(warm_root):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def guardians_of(zygotes: list[psutil.Process]) -> list[psutil.Process]:
    """The zygotes' guardians (their parents; none for a zygote started without one)."""
    found: dict[int, psutil.Process] = {}
    for zygote in zygotes:
        try:
            parent = zygote.parent()
        except psutil.Error:
            continue
        if parent is not None and parent.pid != 1:
            found[parent.pid] = parent
    return list(found.values())


ROLES = ("worker_main", "pool_processes", "guardians", "zygotes", "runs")


def fleet_cpu_by_role(worker_pid: int, warm_root: str) -> dict[str, float]:
    """CPU (s) used so far by a worker's main process, its pool processes (each with what it
    reaped), its zygotes (their own) and their runs (what the zygotes reaped)."""
    found = dict.fromkeys(ROLES, 0.0)

    def add(role: str, proc: psutil.Process, *, own: bool = False) -> None:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            return
        if own:
            found[role] += times.user + times.system
            found["runs"] += times.children_user + times.children_system
        else:
            found[role] += _tree_cpu(proc)

    try:
        main = psutil.Process(worker_pid)
        pool = main.children(recursive=True)
    except psutil.Error:
        return found
    add("worker_main", main)
    for proc in pool:
        add("pool_processes", proc)
    zygotes = zygotes_under(warm_root)
    for proc in zygotes:
        add("zygotes", proc, own=True)
    for proc in guardians_of(zygotes):
        try:  # its own: what it reaped is the zygotes' that ended, counted while they ran
            times = proc.cpu_times()
        except psutil.Error:
            continue
        found["guardians"] += times.user + times.system
    return found


def fleet_cpu_s(worker_pid: int, warm_root: str) -> float:
    """CPU used so far by a worker's processes (its pool children and what they reaped)
    and by its zygotes and their runs."""
    return sum(fleet_cpu_by_role(worker_pid, warm_root).values())


def fleet_memory(worker_pid: int, warm_root: str) -> dict[str, Any]:
    """RSS and USS of each zygote, and of the worker with its zygotes, MB."""
    def full(proc: psutil.Process) -> tuple[float, float]:
        info = proc.memory_full_info()
        return info.rss / MB, info.uss / MB

    zygote_processes = zygotes_under(warm_root)
    zygotes = [full(proc) for proc in zygote_processes]
    guardians = [full(proc) for proc in guardians_of(zygote_processes)]
    main = psutil.Process(worker_pid)
    worker = [full(proc) for proc in [main, *main.children(recursive=True)]]
    return {
        "zygotes": len(zygotes),
        "guardians": len(guardians),
        "per_guardian_rss_mb_median": round(statistics.median(g[0] for g in guardians), 2)
        if guardians else None,
        "per_guardian_uss_mb_median": round(statistics.median(g[1] for g in guardians), 2)
        if guardians else None,
        "per_zygote_rss_mb_median": round(statistics.median(z[0] for z in zygotes), 2)
        if zygotes else None,
        "per_zygote_uss_mb_median": round(statistics.median(z[1] for z in zygotes), 2)
        if zygotes else None,
        "worker_processes_rss_mb": round(sum(w[0] for w in worker), 1),
        "worker_processes_uss_mb": round(sum(w[1] for w in worker), 1),
        "worker_with_zygotes_rss_mb": round(sum(w[0] for w in worker + guardians + zygotes),
                                            1),
        "worker_with_zygotes_uss_mb": round(sum(w[1] for w in worker + guardians + zygotes),
                                            1),
    }


if __name__ == "__main__":
    main()
