"""Throughput of a no-op plugin through PluginClient vs a plain Celery no-op task.

Same Redis, same worker concurrency, same run; rounds alternate between the systems.
Each round enqueues N jobs, then waits for every result in order (time from the first
submit to the last result). Run: `make bench` (or `python bench/throughput.py --help`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

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
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec

NOOP = PluginSpec.model_validate({
    "id": "bench-noop", "name": "Bench no-op", "entrypoint": "pluginpool_examples.text:noop",
    "isolation": {"sandboxed": False}, "resource_limits": {"timeout_ms": 10_000}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="pluginpool-bench-"))
    url = bench_redis_url(run_dir)
    settings = Settings(_env_file=None, redis_url=url,  # type: ignore[call-arg]
                        plugin_paths=[str(ROOT / "examples")])
    client = PluginClient(settings)
    client.register(NOOP)
    env = {**os.environ, "PLUGINPOOL_REDIS_URL": url, "BENCH_REDIS_URL": url,
           "PLUGINPOOL_PLUGIN_PATHS": json.dumps(settings.plugin_paths),
           "PYTHONPATH": str(ROOT / "bench")}
    plain_app = Celery("plain-producer", broker=url, backend=url, set_as_current=False)
    plain_app.conf.update(task_serializer="json", accept_content=["json"])
    figures: dict[str, list[float]] = {"plain_celery": [], "plain_celery_reliable": [],
                                       "pluginpool": []}
    for _ in range(args.rounds):
        for system in figures:
            node = f"bench-{system}@localhost"
            if system.startswith("plain"):
                worker_env = {**env, "BENCH_PLAIN_RELIABLE": "1" if "reliable" in system else "0"}
                proc = plain_celery_worker(client, worker_env, run_dir,
                                           concurrency=args.concurrency, node=node)
                elapsed = timed(lambda: plain_round(plain_app, args.jobs))
            else:
                proc = pluginpool_worker(client, env, run_dir, plugins=NOOP.id,
                                         concurrency=args.concurrency, node=node)
                elapsed = timed(lambda: pluginpool_round(client, NOOP.id, args.jobs))
            proc.stop()
            figures[system].append(args.jobs / elapsed)
    rates = {system: round(median(values), 1) for system, values in figures.items()}
    write_result("throughput", {
        "benchmark": "no-op job, enqueue N then wait for each result",
        "jobs_per_round": args.jobs, "rounds": args.rounds,
        "worker_concurrency": args.concurrency,
        "jobs_per_s_median": rates,
        "jobs_per_s_all": {k: [round(v, 1) for v in vs] for k, vs in figures.items()},
        "ratio_pluginpool_vs_plain_celery": round(rates["pluginpool"] / rates["plain_celery"], 3),
        "ratio_pluginpool_vs_plain_celery_reliable": round(
            rates["pluginpool"] / rates["plain_celery_reliable"], 3),
    })
    client.close()


if __name__ == "__main__":
    main()
