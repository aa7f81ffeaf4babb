"""Events per second the health aggregator keeps up with, and its memory after 100,000
runs, side by side with Flower consuming the same events in the same run.

A publisher sends the events of N synthetic runs (task-received, task-started,
task-succeeded and pluginpool's task-plugin-usage) as fast as it can over the same Redis;
both consumers are measured on what they received, how fast, and their RSS.
Run: `python -m bench.aggregator` (or `make bench`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil

from bench.common import bench_redis_url, write_result
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.pool.tools.redis_bootstrap import free_port
from pluginpool.tasks.app import create_app
from pluginpool.tasks.settings import Settings

EVENTS_PER_RUN = 4


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def aggregator_events(base: str) -> int:
    return int(json.loads(get(base + "/livez"))["events_seen"])


def flower_events(base: str) -> int:
    total = 0.0
    for line in get(base + "/metrics").splitlines():
        if line.startswith("flower_events_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def rss_mb(proc: ManagedProcess) -> float:
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    return round(sum(p.memory_info().rss for p in tree) / 2**20, 1)


def publish(settings: Settings, runs: int, offset: int = 0) -> float:
    app = create_app(settings, guarded_transport=False)
    started = time.perf_counter()
    with app.connection_for_write() as conn:
        dispatcher = app.events.Dispatcher(conn, hostname="bench-publisher@localhost",
                                           enabled=True)
        for i in range(offset, offset + runs):
            task_id = str(uuid.uuid4())
            name = f"plugin.bench-{i % 10}"
            dispatcher.send("task-received", uuid=task_id, name=name, args="()",
                            kwargs="{'payload': 1}", retries=0, eta=None)
            dispatcher.send("task-started", uuid=task_id)
            dispatcher.send("task-succeeded", uuid=task_id, result="{'value': 1}",
                            runtime=0.001)
            dispatcher.send("task-plugin-usage", uuid=task_id, plugin_id=f"bench-{i % 10}",
                            usage={"wall_ms": 1.0, "cpu_ms": 0.5})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--publishers", type=int, default=3)
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="pluginpool-bench-"))
    url = bench_redis_url(run_dir)
    settings = Settings(_env_file=None, redis_url=url)  # type: ignore[call-arg]
    env = {**os.environ, "PLUGINPOOL_REDIS_URL": url}
    cli = [sys.executable, "-m", "pluginpool.pool.tools.cli"]
    agg_port, flower_port = free_port(), free_port()
    agg_base, flower_base = f"http://127.0.0.1:{agg_port}", f"http://127.0.0.1:{flower_port}"
    aggregator = ManagedProcess([*cli, "aggregator", "--port", str(agg_port)], env=env,
                                log_path=run_dir / "aggregator.log")
    flower = ManagedProcess([*cli, "flower", "--port", str(flower_port)], env=env,
                            log_path=run_dir / "flower.log")
    try:
        assert wait_until(lambda: _up(agg_base + "/livez") and _up(flower_base + "/metrics"),
                          timeout_s=60)
        time.sleep(2)
        before = {"aggregator": rss_mb(aggregator), "flower": rss_mb(flower)}
        base_counts = {"aggregator": aggregator_events(agg_base),
                       "flower": flower_events(flower_base)}
        share = args.runs // args.publishers
        total = share * args.publishers * EVENTS_PER_RUN
        started = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(args.publishers) as pool:
            pool.starmap(publish, [(settings, share, n * share) for n in range(args.publishers)])
        publish_s = time.perf_counter() - started
        readers = {"aggregator": lambda: aggregator_events(agg_base) - base_counts["aggregator"],
                   "flower": lambda: flower_events(flower_base) - base_counts["flower"]}
        received: dict[str, int] = {}
        drained_s: dict[str, float] = {}
        for name, read in readers.items():
            last, stable_since = -1, time.perf_counter()
            while time.perf_counter() - stable_since < 5 and read() < total:
                now_count = read()
                if now_count != last:
                    last, stable_since = now_count, time.perf_counter()
                time.sleep(0.5)
            received[name] = read()
            drained_s[name] = time.perf_counter() - started
        after = {"aggregator": rss_mb(aggregator), "flower": rss_mb(flower)}
        result: dict[str, Any] = {
            "benchmark": "Celery events of synthetic runs, published as fast as possible",
            "runs": share * args.publishers, "publishers": args.publishers,
            "events_published": total,
            "publish_rate_events_per_s": round(total / publish_s),
            "consumers": {name: {
                "events_received": received[name],
                "events_lost": total - received[name],
                "events_per_s": round(received[name] / drained_s[name]),
                "rss_mb_before": before[name], "rss_mb_after": after[name]}
                for name in readers},
        }
        write_result("aggregator", result)
    finally:
        aggregator.stop()
        flower.stop()


def _up(url: str) -> bool:
    try:
        get(url)
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
