"""The sandbox's cost and how well its limits hold.

1. Throughput of a no-op job: plain Celery, pluginpool unsandboxed, the fork floor
   (unsandboxed plus a bare fork of a small interpreter per run: the least any zygote
   costs), pluginpool sandboxed (warm sandboxes: a fork of a set-up zygote per run), same
   Redis, same worker concurrency, rounds alternating; the CPU every system's processes
   used per job.
2. The CPU and minor page faults one sandboxed run costs on each side of the boundary
   (bench/sandbox_cost.py), and what supervising a run costs the pool child
   (bench/supervision.py).
3. A plugin whose setup takes 1 s: 100 runs on one instance against cold set-ups.
4. Memory: each warm sandbox (RSS, USS) and a worker with PLUGINPOOL_WARM_SANDBOXES full.
5. Time from a limit being crossed to the run being stopped: memory and wall clock; the
   CPU share a hog limited to 25 % actually got.
Run: `python -m bench.sandbox` (or `make bench`). With BENCH_BASELINE_CODE (a directory
holding pluginpool/{tasks,pool,policy} of an older revision) the sandboxed throughput,
the per-run cost and the supervision are also measured for that code, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from celery import Celery

from bench.common import (
    ROOT,
    bench_redis_url,
    median,
    plain_celery_worker,
    plain_round,
    pluginpool_round,
    pluginpool_worker,
    timed,
    write_result,
)
from bench.sandbox_cost import fleet_cpu_by_role, fleet_cpu_s, fleet_memory
from pluginpool.policy.errors import PluginExecutionError
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec


def spec(plugin_id: str, function: str, **fields: Any) -> PluginSpec:
    return PluginSpec.model_validate({"id": plugin_id, "name": plugin_id,
                                      "entrypoint": f"bench_plugins:{function}", **fields})


SPECS = [
    spec("noop-sandboxed", "noop", resource_limits={"timeout_ms": 10_000}),
    spec("noop-in-pool", "noop", isolation={"sandboxed": False},
         resource_limits={"timeout_ms": 10_000}),
    spec("memory-crosser", "cross_memory_limit", isolation={"max_restarts": 0},
         resource_limits={"max_memory_mb": 64, "timeout_ms": 30_000}),
    spec("wall-clock", "busy", resource_limits={"timeout_ms": 500}),
    spec("cpu-25", "busy", resource_limits={"max_cpu_percent": 25, "timeout_ms": 30_000}),
    spec("fork-floor", "ForkFloor", isolation={"sandboxed": False},
         resource_limits={"timeout_ms": 10_000}),
    spec("slow-setup", "SlowSetup", resource_limits={"timeout_ms": 10_000,
                                                     "setup_timeout_ms": 10_000}),
]
WARMUP_JOBS = 20
PLUGIN_OF = {"pluginpool_in_pool": "noop-in-pool", "pluginpool_fork_floor": "fork-floor",
             "pluginpool_sandboxed": "noop-sandboxed",
             "pluginpool_sandboxed_before": "noop-sandboxed"}
"""The plugin each pluginpool system runs. The fork floor is the unsandboxed path plus the
least any zygote design costs a run (bench_plugins.ForkFloor): the ratio no sandbox built
on a fork per run can pass on this host."""


def limits(client: PluginClient, samples: int, *, worker_pid: int,
           warm_root: str) -> dict[str, Any]:
    memory, wall, end_to_end, cpu, tree = [], [], [], [], []
    for _ in range(samples):
        iid = client.load("memory-crosser")
        try:
            client.execute(iid, {"below_mb": 40, "step_mb": 32}, timeout=60)
        except PluginExecutionError as exc:
            crossed = client.redis.hget(client.settings.keys.storage(iid), "crossing_at")
            stopped = exc.details["usage"].get("stopped_at_unix")
            if crossed and stopped:
                memory.append((stopped - float(crossed)) * 1000)
        client.unload(iid)
        started = time.monotonic()
        try:
            client.submit("wall-clock", {}).result(timeout=60)
        except PluginExecutionError as exc:
            end_to_end.append((time.monotonic() - started) * 1000 - 500)
            wall.append(exc.details["usage"]["wall_ms"] - 500)
        before, started = fleet_cpu_s(worker_pid, warm_root), time.monotonic()
        job = client.submit("cpu-25", {"seconds": 3})
        job.result(timeout=60)
        # The worker's whole tree (main process, pool child, zygote, run) over the job.
        tree.append(100 * (fleet_cpu_s(worker_pid, warm_root) - before)
                    / (time.monotonic() - started))
        cpu.append(job.meta["usage"]["cpu_percent"])

    def summary(values: list[float]) -> dict[str, float]:
        return {"median": round(statistics.median(values), 1), "max": round(max(values), 1),
                "n": len(values)} if values else {}

    return {"memory_stop_after_crossing_ms": summary(memory),
            "wall_clock_stop_after_timeout_ms": summary(wall),
            "wall_clock_error_seen_by_producer_after_timeout_ms": summary(end_to_end),
            "cpu_percent_of_25_percent_hog": summary(cpu),
            "worker_tree_cpu_percent_during_25_percent_hog": summary(tree)}


def _cpu_s(worker_pid: int, warm_root: str, store: Any) -> dict[str, float]:
    """CPU (s) so far of every process a job crosses: this producer, the worker by role,
    and Redis (whose database is the benchmark's own; the server is shared)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    redis_cpu: dict[str, Any] = store.info("cpu")
    return {"producer": usage.ru_utime + usage.ru_stime,
            **fleet_cpu_by_role(worker_pid, warm_root),
            "redis": float(redis_cpu["used_cpu_user"]) + float(redis_cpu["used_cpu_sys"])}


def throughput(client: PluginClient, env: dict[str, str], run_dir: Path, plain_app: Celery,
               *, jobs: int, rounds: int) -> dict[str, Any]:
    """Jobs/s and the CPU every process used per job (the worker's by role), rounds
    alternating."""
    rates: dict[str, list[float]] = {"plain_celery": [], "pluginpool_in_pool": [],
                                     "pluginpool_fork_floor": [], "pluginpool_sandboxed": []}
    if env.get("BENCH_BASELINE_CODE"):
        rates["pluginpool_sandboxed_before"] = []
    cpu_ms: dict[str, list[dict[str, float]]] = {system: [] for system in rates}
    for _ in range(rounds):
        for system in rates:
            node = f"bench-{system}@localhost"
            warm_root = str(run_dir / f"warm-{system}")
            worker_env = {**env, "PLUGINPOOL_WARM_ROOT": warm_root}
            if system.endswith("_before"):
                worker_env["PYTHONPATH"] = os.pathsep.join(
                    [env["BENCH_BASELINE_CODE"], env["PYTHONPATH"]])
            if system == "plain_celery":
                proc = plain_celery_worker(client, worker_env, run_dir, concurrency=2, node=node)
                plain_round(plain_app, WARMUP_JOBS)
                before = _cpu_s(proc.pid, warm_root, client.redis)
                elapsed = timed(lambda: plain_round(plain_app, jobs))
            else:
                plugin = PLUGIN_OF[system]
                proc = pluginpool_worker(client, worker_env, run_dir, plugins=plugin,
                                         concurrency=2, node=node)
                pluginpool_round(client, plugin, WARMUP_JOBS)
                before = _cpu_s(proc.pid, warm_root, client.redis)
                elapsed = timed(lambda p=plugin: pluginpool_round(client, p, jobs))
            after = _cpu_s(proc.pid, warm_root, client.redis)
            cpu_ms[system].append({k: (after[k] - before[k]) * 1000 / jobs for k in after})
            proc.stop()
            rates[system].append(jobs / elapsed)
    medians = {system: round(median(values), 1) for system, values in rates.items()}
    by_process = {system: {k: round(median([r[k] for r in rows]), 3) for k in rows[0]}
                  for system, rows in cpu_ms.items()}
    worker = {system: sum(v for k, v in figures.items() if k not in ("producer", "redis"))
              for system, figures in by_process.items()}
    cpu = {system: round(value, 2) for system, value in worker.items()}
    extra: dict[str, Any] = {}
    if "pluginpool_sandboxed_before" in medians:
        extra["ratio_sandboxed_before_vs_plain"] = round(
            medians["pluginpool_sandboxed_before"] / medians["plain_celery"], 3)
        extra["sandbox_cpu_ms_per_job_before"] = round(
            cpu["pluginpool_sandboxed_before"] - cpu["pluginpool_in_pool"], 2)
    return {
        "jobs_per_round": jobs, "rounds": rounds, "worker_concurrency": 2, **extra,
        "jobs_per_s_median": medians,
        "jobs_per_s_all": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
        "ratio_sandboxed_vs_plain": round(medians["pluginpool_sandboxed"]
                                          / medians["plain_celery"], 3),
        "ratio_in_pool_vs_plain": round(medians["pluginpool_in_pool"]
                                        / medians["plain_celery"], 3),
        "ratio_fork_floor_vs_plain": round(medians["pluginpool_fork_floor"]
                                           / medians["plain_celery"], 3),
        "worker_cpu_ms_per_job_median": cpu,
        "cpu_ms_per_job_by_process_median": by_process,
        "cpu_ms_per_job_all_processes": {system: round(sum(figures.values()), 2)
                                         for system, figures in by_process.items()},
        "sandbox_cpu_ms_per_job": round(cpu["pluginpool_sandboxed"]
                                        - cpu["pluginpool_in_pool"], 2),
    }


def _in_subprocess(code: str, env: dict[str, str], baseline: bool) -> Any:
    """Run `code` (it prints JSON) in a fresh interpreter: this tree's code or the
    baseline's (BENCH_BASELINE_CODE first on the path)."""
    paths = [str(ROOT), *([env["BENCH_BASELINE_CODE"]] if baseline else [])]
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, text=True,
                         capture_output=True, timeout=600,
                         env={**env, "PYTHONPATH": os.pathsep.join(paths[::-1])})
    return json.loads(out.stdout)


def per_run_cost(env: dict[str, str], *, runs: int, rounds: int) -> dict[str, Any]:
    """bench/sandbox_cost.py's figures, median of `rounds` (alternating with the baseline's
    when there is one): CPU and minor faults per run on each side."""
    code = ("import json; from pathlib import Path; from bench.sandbox_cost import measure; "
            f"print(json.dumps(measure(Path('bench').resolve(), {runs})))")
    versions = ["now", "before"] if env.get("BENCH_BASELINE_CODE") else ["now"]
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in versions}
    for _ in range(rounds):
        for version in versions:
            samples[version].append(_in_subprocess(code, env, version == "before"))
    result: dict[str, Any] = {"runs": runs, "rounds": rounds}
    for version, found in samples.items():
        by_total = sorted(found, key=lambda r: r["cpu_ms_per_run"]["total"])
        result[version] = {"median_round": by_total[len(by_total) // 2],
                           "cpu_ms_total_all": [r["cpu_ms_per_run"]["total"] for r in found]}
    return result


def supervision_cost(env: dict[str, str], *, seconds: float) -> dict[str, Any]:
    """bench/supervision.py: the pool child's CPU while it supervises a throttled, a busy
    and an idle run (and the baseline's)."""
    code = ("import json; from bench.supervision import measure; "
            f"print(json.dumps(measure({seconds})))")
    versions = ["now", "before"] if env.get("BENCH_BASELINE_CODE") else ["now"]
    return {version: _in_subprocess(code, env, version == "before")["cases"]
            for version in versions}


def slow_setup(client: PluginClient, *, runs: int, cold_samples: int) -> dict[str, Any]:
    """A 1 s setup: `runs` jobs on one instance, against `cold_samples` jobs each on a new
    instance (a new warm sandbox, so a new setup), scaled to `runs`."""
    iid = client.load("slow-setup", {"setup_s": 1.0})
    warm_s = timed(lambda: [job.result(timeout=120) for job in
                            [client.submit("slow-setup", {}, instance_id=iid)
                             for _ in range(runs)]])
    client.unload(iid)
    cold: list[float] = []
    for _ in range(cold_samples):
        other = client.load("slow-setup", {"setup_s": 1.0})
        cold.append(timed(lambda o=other: client.execute(o, {}, timeout=120)))
        client.unload(other)
    cold_s = statistics.mean(cold) * runs
    return {"runs": runs, "warm_total_s": round(warm_s, 2),
            "cold_job_s_mean": round(statistics.mean(cold), 3), "cold_samples": cold_samples,
            "cold_total_s_for_runs": round(cold_s, 1),
            "warm_vs_cold": round(warm_s / cold_s, 4)}


def memory(client: PluginClient, env: dict[str, str], run_dir: Path, *,
           capacity: int) -> dict[str, Any]:
    """A worker (2 processes) whose every process holds `capacity` warm sandboxes."""
    warm_root = str(run_dir / "warm-memory")
    proc = pluginpool_worker(client, {**env, "PLUGINPOOL_WARM_ROOT": warm_root,
                                      "PLUGINPOOL_WARM_SANDBOXES": str(capacity)},
                             run_dir, plugins="noop-sandboxed", concurrency=2,
                             node="bench-memory@localhost")
    try:
        instances = [client.load("noop-sandboxed") for _ in range(capacity * 2)]
        for _ in range(3):
            jobs = [client.submit("noop-sandboxed", {}, instance_id=iid) for iid in instances]
            for job in jobs:
                job.result(timeout=60)
        return {"warm_sandboxes_setting": capacity, **fleet_memory(proc.pid, warm_root)}
    finally:
        proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit-samples", type=int, default=5)
    parser.add_argument("--cost-runs", type=int, default=500)
    parser.add_argument("--cost-rounds", type=int, default=3)
    parser.add_argument("--supervision-s", type=float, default=5.0)
    parser.add_argument("--cold-samples", type=int, default=5)
    parser.add_argument("--throughput-only", action="store_true",
                        help="measure section 1 alone and print it (nothing written)")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="pluginpool-bench-"))
    url = bench_redis_url(run_dir)
    settings = Settings(_env_file=None, redis_url=url,  # type: ignore[call-arg]
                        plugin_paths=[str(ROOT / "bench")])
    client = PluginClient(settings)
    client.register(SPECS)
    env = {**os.environ, "PLUGINPOOL_REDIS_URL": url, "BENCH_REDIS_URL": url,
           "PLUGINPOOL_PLUGIN_PATHS": json.dumps(settings.plugin_paths),
           "PYTHONPATH": str(ROOT / "bench")}
    plain_app = Celery("plain-producer", broker=url, backend=url, set_as_current=False)
    plain_app.conf.update(task_serializer="json", accept_content=["json"])

    rates = throughput(client, env, run_dir, plain_app, jobs=args.jobs, rounds=args.rounds)
    if args.throughput_only:
        print(json.dumps(rates, indent=2))
        client.close()
        return
    cost = per_run_cost(env, runs=args.cost_runs, rounds=args.cost_rounds)
    supervision = supervision_cost(env, seconds=args.supervision_s)
    proc = pluginpool_worker(client, {**env, "PLUGINPOOL_WARM_ROOT": str(run_dir / "w1")},
                             run_dir, plugins="slow-setup", concurrency=1,
                             node="bench-setup@localhost")
    try:
        setup = slow_setup(client, runs=100, cold_samples=args.cold_samples)
    finally:
        proc.stop()
    memory_figures = memory(client, env, run_dir, capacity=4)
    limits_root = str(run_dir / "warm-limits")
    proc = pluginpool_worker(client, {**env, "PLUGINPOOL_WARM_ROOT": limits_root}, run_dir,
                             plugins="memory-crosser,wall-clock,cpu-25",
                             concurrency=1, node="bench-limits@localhost")
    try:
        limit_figures = limits(client, args.limit_samples, worker_pid=proc.pid,
                               warm_root=limits_root)
    finally:
        proc.stop()
    write_result("sandbox", {
        "benchmark": "no-op throughput by isolation; sandbox CPU per run; warm setup; "
                     "memory; limit enforcement",
        "command": "python -m bench.sandbox " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "baseline_code": os.environ.get("BENCH_BASELINE_CODE"),
        "throughput": rates, "cpu_per_run_one_sandbox": cost, "supervision": supervision,
        "slow_setup": setup,
        "memory": memory_figures, "limits": limit_figures,
    })
    client.close()


if __name__ == "__main__":
    main()
