"""The breaker's cost: round trips per job, acquire latency next to PING, path throughput.

Round trips are read from Redis `INFO commandstats` (reset before each measurement).
Run: `python -m bench.breaker` (or `make bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import redis

from bench.common import (
    ROOT,
    bench_redis_url,
    median,
    pluginpool_worker,
    timed,
    write_result,
)
from pluginpool.policy.breaker import BreakerConfig, CircuitBreaker
from pluginpool.policy.keys import RedisKeys
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec

NOOP = PluginSpec.model_validate({
    "id": "bench-noop", "name": "Bench no-op", "entrypoint": "pluginpool_examples.text:noop",
    "isolation": {"sandboxed": False}, "resource_limits": {"timeout_ms": 10_000}})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def command_calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def latencies(client: redis.Redis, n: int) -> dict[str, dict[str, float]]:
    breaker = CircuitBreaker(client, RedisKeys("pluginpool-bench:"))
    cfg = BreakerConfig()
    ping: list[float] = []
    acquire: list[float] = []
    record: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.ping()
        t1 = time.perf_counter()
        breaker.acquire("p", cfg, default_open_ms=1000)
        t2 = time.perf_counter()
        breaker.record("p", cfg, default_open_ms=1000, error_type=None, duration_ms=1.0)
        t3 = time.perf_counter()
        ping.append((t1 - t0) * 1e6)
        acquire.append((t2 - t1) * 1e6)
        record.append((t3 - t2) * 1e6)
    return {name: {"p50_us": round(percentile(v, 0.5), 1), "p99_us": round(percentile(v, 0.99), 1)}
            for name, v in (("ping", ping), ("acquire", acquire), ("record", record))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="pluginpool-bench-"))
    url = bench_redis_url(run_dir)
    raw = redis.Redis.from_url(url, decode_responses=True)

    latencies(raw, 200)  # warm-up: script loaded, connection open
    raw.config_resetstat()
    lat = latencies(raw, args.samples)
    calls = command_calls(raw)
    calls_per_op = {name: round(count / args.samples, 3) for name, count in calls.items()
                    if name in ("evalsha", "eval", "ping")}

    figures: dict[str, list[float]] = {"breaker_on": [], "breaker_off": []}
    per_job: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for mode in figures:
            enabled = mode == "breaker_on"
            settings = Settings(_env_file=None, redis_url=url,  # type: ignore[call-arg]
                                plugin_paths=[str(ROOT / "examples")], breaker_enabled=enabled)
            client = PluginClient(settings)
            client.register(NOOP)
            env = {**os.environ, "PLUGINPOOL_REDIS_URL": url,
                   "PLUGINPOOL_BREAKER_ENABLED": str(enabled).lower(),
                   "PLUGINPOOL_PLUGIN_PATHS": json.dumps(settings.plugin_paths)}
            proc = pluginpool_worker(client, env, run_dir, plugins=NOOP.id, concurrency=2,
                                     node=f"bench-{mode}@localhost")
            raw.config_resetstat()

            def run(client: PluginClient = client) -> None:
                jobs = [client.submit(NOOP.id, {"i": i}) for i in range(args.jobs)]
                for job in jobs:
                    job.result(timeout=60)

            elapsed = timed(run)
            stats = command_calls(raw)
            per_job[mode] = {name: round(count / args.jobs, 2) for name, count in stats.items()
                             if count >= args.jobs / 2}
            proc.stop()
            client.close()
            figures[mode].append(args.jobs / elapsed)
    rates = {mode: round(median(values), 1) for mode, values in figures.items()}
    write_result("breaker", {
        "benchmark": "breaker acquire/record vs PING; no-op path with and without the breaker",
        "samples": args.samples, "latency": lat, "calls_per_acquire_plus_record": calls_per_op,
        "jobs_per_round": args.jobs, "rounds": args.rounds,
        "jobs_per_s_median": rates,
        "jobs_per_s_all": {k: [round(v, 1) for v in vs] for k, vs in figures.items()},
        "ratio_on_vs_off": round(rates["breaker_on"] / rates["breaker_off"], 3),
        "redis_commands_per_job": per_job,
    })


if __name__ == "__main__":
    main()
