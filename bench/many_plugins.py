"""A thousand plugins cost what one does: throughput and idle Redis load by plugin count.

For 1, 1,000 and 10,000 registered no-op plugins (unsandboxed), one worker (`--plugins
all`, 2 processes) runs N jobs spread at random over the plugins; then, idle, its Redis
commands per second are counted on a private `redis-server` (nothing else talks to it).
Fairness: one plugin with a deep backlog and 100 others with 10 jobs each.
Run: `python -m bench.many_plugins` (or `make bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import redis

from bench.common import ROOT, pluginpool_worker, private_redis, write_result
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec

IDLE_S = 10.0


def noop(plugin_id: str) -> PluginSpec:
    return PluginSpec.model_validate({
        "id": plugin_id, "name": plugin_id, "entrypoint": "bench_plugins:noop",
        "isolation": {"sandboxed": False}, "resource_limits": {"timeout_ms": 10_000}})


def commands(store: redis.Redis) -> int:
    return int(store.info("stats")["total_commands_processed"])


def one_point(url: str, run_dir: Path, plugins: int, jobs: int) -> dict[str, float]:
    store = redis.Redis.from_url(url)
    store.flushall()
    settings = Settings(_env_file=None, redis_url=url, breaker_enabled=False,  # type: ignore[call-arg]
                        usage_events=False, plugin_paths=[str(ROOT / "bench")])
    client = PluginClient(settings)
    ids = [f"p{i:05d}" for i in range(plugins)]
    started = time.perf_counter()
    client.register([noop(pid) for pid in ids])
    register_s = time.perf_counter() - started
    env = {**os.environ, "PLUGINPOOL_REDIS_URL": url,
           "PLUGINPOOL_BREAKER_ENABLED": "false", "PLUGINPOOL_USAGE_EVENTS": "false",
           "PLUGINPOOL_PLUGIN_PATHS": json.dumps(settings.plugin_paths)}
    node = f"bench-many-{plugins}@localhost"
    started = time.perf_counter()
    worker = pluginpool_worker(client, env, run_dir, plugins="all", concurrency=2, node=node,
                               timeout_s=900)
    start_s = time.perf_counter() - started
    try:
        rng = random.Random(plugins)
        started = time.perf_counter()
        submitted = [client.submit(rng.choice(ids), i) for i in range(jobs)]
        for job in submitted:
            job.result(timeout=300)
        jobs_per_s = jobs / (time.perf_counter() - started)
        time.sleep(2)
        before = commands(store)
        time.sleep(IDLE_S)
        idle = (commands(store) - before - 1) / IDLE_S
    finally:
        worker.stop()
        client.close()
    return {"jobs_per_s": round(jobs_per_s, 1), "idle_commands_per_s": round(idle, 1),
            "register_s": round(register_s, 2), "worker_start_s": round(start_s, 1)}


def fairness(url: str, run_dir: Path, backlog: int, others: int, each: int) -> dict[str, float]:
    store = redis.Redis.from_url(url)
    store.flushall()
    settings = Settings(_env_file=None, redis_url=url, breaker_enabled=False,  # type: ignore[call-arg]
                        usage_events=False, plugin_paths=[str(ROOT / "bench")])
    client = PluginClient(settings)
    client.register([noop("deep")] + [noop(f"o{i:03d}") for i in range(others)])
    env = {**os.environ, "PLUGINPOOL_REDIS_URL": url, "PLUGINPOOL_BREAKER_ENABLED": "false",
           "PLUGINPOOL_USAGE_EVENTS": "false",
           "PLUGINPOOL_PLUGIN_PATHS": json.dumps(settings.plugin_paths)}
    deep = [client.submit("deep", i) for i in range(backlog)]
    worker = pluginpool_worker(client, env, run_dir, plugins="all", concurrency=2,
                               node="bench-fair@localhost")
    try:
        started = time.perf_counter()
        small = [client.submit(f"o{i:03d}", j) for i in range(others) for j in range(each)]
        for job in small:
            job.result(timeout=300)
        others_s = time.perf_counter() - started
        left = store.llen("plugins.deep")
        deep[-1].result(timeout=600)
        backlog_s = time.perf_counter() - started
    finally:
        worker.stop()
        client.close()
    return {"others_done_s": round(others_s, 2), "backlog_left_when_others_done": left,
            "backlog_done_s": round(backlog_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--plugins", default="1,1000,10000")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="pluginpool-bench-many-"))
    server, url = private_redis(run_dir)
    try:
        points = {n: one_point(url, run_dir, int(n), args.jobs)
                  for n in args.plugins.split(",")}
        fair = fairness(url, run_dir, backlog=10_000, others=100, each=10)
    finally:
        server.stop()
    base = points[args.plugins.split(",")[0]]["jobs_per_s"]
    write_result("many_plugins", {
        "benchmark": "no-op jobs spread at random over N registered plugins; one worker "
                     "(--plugins all, 2 processes); idle Redis commands/s on a private server",
        "jobs": args.jobs, "points": points,
        "relative_to_first": {n: round(p["jobs_per_s"] / base, 2) for n, p in points.items()},
        "fairness_backlog_10000_others_100x10": fair})


if __name__ == "__main__":
    main()
