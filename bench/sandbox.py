"""The sandbox's cost and how well its limits hold.

1. Throughput of a no-op job: plain Celery, pluginpool unsandboxed, pluginpool sandboxed,
   same Redis, same worker concurrency, rounds alternating.
2. Time from a limit being crossed to the run being stopped: memory (the plugin notes the
   moment it crossed, the supervisor the moment it killed) and wall clock.
3. The CPU share a hog limited to 25 % actually got.
Run: `python -m bench.sandbox` (or `make bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
]


def limits(client: PluginClient, samples: int) -> dict[str, Any]:
    memory, wall, end_to_end, cpu = [], [], [], []
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
        job = client.submit("cpu-25", {"seconds": 3})
        job.result(timeout=60)
        cpu.append(job.meta["usage"]["cpu_percent"])

    def summary(values: list[float]) -> dict[str, float]:
        return {"median": round(statistics.median(values), 1), "max": round(max(values), 1),
                "n": len(values)} if values else {}

    return {"memory_stop_after_crossing_ms": summary(memory),
            "wall_clock_stop_after_timeout_ms": summary(wall),
            "wall_clock_error_seen_by_producer_after_timeout_ms": summary(end_to_end),
            "cpu_percent_of_25_percent_hog": summary(cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit-samples", type=int, default=5)
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

    figures: dict[str, list[float]] = {"plain_celery": [], "pluginpool_in_pool": [],
                                       "pluginpool_sandboxed": []}
    for _ in range(args.rounds):
        for system in figures:
            node = f"bench-{system}@localhost"
            if system == "plain_celery":
                proc = plain_celery_worker(client, env, run_dir, concurrency=2, node=node)
                elapsed = timed(lambda: plain_round(plain_app, args.jobs))
            else:
                plugin = "noop-sandboxed" if system.endswith("sandboxed") else "noop-in-pool"
                proc = pluginpool_worker(client, env, run_dir, plugins=plugin, concurrency=2,
                                         node=node)
                elapsed = timed(lambda p=plugin: pluginpool_round(client, p, args.jobs))
            proc.stop()
            figures[system].append(args.jobs / elapsed)
    rates = {system: round(median(values), 1) for system, values in figures.items()}

    proc = pluginpool_worker(client, env, run_dir, plugins="memory-crosser,wall-clock,cpu-25",
                             concurrency=1, node="bench-limits@localhost")
    try:
        limit_figures = limits(client, args.limit_samples)
    finally:
        proc.stop()
    write_result("sandbox", {
        "benchmark": "no-op throughput by isolation; limit enforcement",
        "jobs_per_round": args.jobs, "rounds": args.rounds, "worker_concurrency": 2,
        "jobs_per_s_median": rates,
        "jobs_per_s_all": {k: [round(v, 1) for v in vs] for k, vs in figures.items()},
        "ratio_sandboxed_vs_plain": round(rates["pluginpool_sandboxed"]
                                          / rates["plain_celery"], 3),
        "ratio_in_pool_vs_plain": round(rates["pluginpool_in_pool"] / rates["plain_celery"], 3),
        "limits": limit_figures,
    })
    client.close()


if __name__ == "__main__":
    main()
