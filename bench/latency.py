"""Submit-to-result latency on an idle worker, and 1,000 concurrent awaits on one loop.

Latency: one `pluginpool worker` (2 processes, the no-op plugin in the pool child) idles
between jobs (0.3 s); each sample is one job from `PluginClient`, `AsyncPluginClient` or a
plain Celery producer (no pluginpool import on its path: `send_task` by name and queue),
the three taking turns. Two Redis configurations:

- `keyspace_events`: the default; the worker enables `notify-keyspace-events` E + l (or
  finds them on), so a plain producer's push wakes it;
- `no_keyspace_events`: the worker may not use them (`PLUGINPOOL_BROKER_KEYSPACE_EVENTS=
  false`, as on a managed Redis that refuses CONFIG SET and has them off): a plain
  producer's job waits for the idle worker's rescan (`PLUGINPOOL_BROKER_IDLE_WAIT_S`).

Throughput: N no-op jobs submitted, then every result awaited: with the threaded client
(submit each, then `result()` each) and with the asyncio client (all submits gathered, then
all results gathered on one loop), median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery

from bench.common import (
    ROOT,
    bench_redis_url,
    median,
    pluginpool_round,
    pluginpool_worker,
    timed,
    write_result,
)
from bench.throughput import NOOP
from pluginpool.tasks.async_client import AsyncPluginClient
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings

IDLE_S = 0.3
PRODUCERS = ("plugin_client", "async_plugin_client", "plain_celery_producer")


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50_ms": round(statistics.median(ordered), 1), "p99_ms": round(p99, 1),
            "max_ms": round(ordered[-1], 1), "samples": len(ordered)}


async def sample_latencies(client: PluginClient, aclient: AsyncPluginClient, plain: Celery,
                           samples: int) -> dict[str, list[float]]:
    """Milliseconds from submit to result, the producers taking turns on an idle worker."""
    latencies: dict[str, list[float]] = {name: [] for name in PRODUCERS}
    for i in range(samples):
        for name in PRODUCERS:
            await asyncio.sleep(IDLE_S)  # idle: the worker waits on its wake-up list
            started = time.perf_counter()
            if name == "plugin_client":
                client.submit(NOOP.id, {"i": i}).result(timeout=30)
            elif name == "async_plugin_client":
                await (await aclient.submit(NOOP.id, {"i": i})).result(timeout=30)
            else:
                plain.send_task(f"plugin.{NOOP.id}", args=[{"i": i}],
                                queue=f"plugins.{NOOP.id}").get(timeout=30)
            latencies[name].append((time.perf_counter() - started) * 1000)
    return latencies


async def async_round(aclient: AsyncPluginClient, jobs: int) -> int:
    """Submit N jobs and await them all concurrently; the most threads seen meanwhile."""
    submitted = await asyncio.gather(*(aclient.submit(NOOP.id, {"i": i}) for i in range(jobs)))
    most = threading.active_count()
    await asyncio.gather(*(job.result(timeout=300) for job in submitted))
    return max(most, threading.active_count())


def measure(url: str, run_dir: Path, *, keyspace_events: bool, samples: int, jobs: int,
            rounds: int) -> dict[str, Any]:
    settings = Settings(_env_file=None, redis_url=url,  # type: ignore[call-arg]
                        breaker_enabled=False, plugin_paths=[str(ROOT / "examples")])
    client = PluginClient(settings)
    client.register(NOOP)
    env = {**os.environ, "PLUGINPOOL_REDIS_URL": url, "PLUGINPOOL_BREAKER_ENABLED": "false",
           "PLUGINPOOL_PLUGIN_PATHS": json.dumps(settings.plugin_paths),
           "PLUGINPOOL_BROKER_KEYSPACE_EVENTS": "true" if keyspace_events else "false"}
    plain = Celery("plain-producer", broker=url, backend=url, set_as_current=False)
    plain.conf.update(task_serializer="json", accept_content=["json"],
                      result_accept_content=["json"])
    node = f"bench-latency-{'ks' if keyspace_events else 'noks'}@localhost"
    worker = pluginpool_worker(client, env, run_dir, plugins=NOOP.id, concurrency=2, node=node)
    result: dict[str, Any] = {}

    async def run() -> None:
        async with AsyncPluginClient(settings, sync_client=client) as aclient:
            await aclient.submit(NOOP.id, {"warm": True})  # connections, scripts, caches
            latencies = await sample_latencies(client, aclient, plain, samples)
            result["latency_ms"] = {name: percentiles(v) for name, v in latencies.items()}
            if not jobs:
                return
            threaded: list[float] = []
            concurrent: list[float] = []
            threads: list[int] = []
            for _ in range(rounds):
                threaded.append(jobs / timed(lambda: pluginpool_round(client, NOOP.id, jobs)))
                started = time.perf_counter()
                threads.append(await async_round(aclient, jobs))
                concurrent.append(jobs / (time.perf_counter() - started))
            result["throughput_jobs_per_s"] = {
                "plugin_client_submit_then_wait": round(median(threaded), 1),
                "async_plugin_client_concurrent_awaits": round(median(concurrent), 1),
                "all_rounds": {"threaded": [round(x, 1) for x in threaded],
                               "async": [round(x, 1) for x in concurrent]},
                "jobs_per_round": jobs, "most_threads_during_async_round": max(threads)}

    try:
        asyncio.run(run())
    finally:
        worker.stop()
        plain.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=40, help="latency samples per producer")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="pluginpool-bench-"))
    url = bench_redis_url(run_dir)
    with_events = measure(url, run_dir, keyspace_events=True, samples=args.samples,
                          jobs=args.jobs, rounds=args.rounds)
    without = measure(url, run_dir, keyspace_events=False, samples=args.samples, jobs=0,
                      rounds=0)
    idle_wait = Settings(_env_file=None).broker_idle_wait_s  # type: ignore[call-arg]
    write_result("latency", {
        "benchmark": "submit-to-result latency of a no-op job on an idle worker (2 processes, "
                     "pool child), three producers taking turns; throughput of N concurrent "
                     "awaits on one loop vs the threaded client",
        "keyspace_events": with_events,
        "no_keyspace_events": {**without, "idle_wait_s": idle_wait},
    })


if __name__ == "__main__":
    main()
