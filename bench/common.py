"""Helpers shared by the benchmarks: a Redis database of their own, workers started by PID."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.pool.tools.redis_bootstrap import ensure_redis, free_port, ping, with_db

BENCH_DB = int(os.environ.get("PLUGINPOOL_BENCH_REDIS_DB", "12"))
ROOT = Path(__file__).resolve().parent.parent


def bench_redis_url(run_dir: Path) -> str:
    reachable = ensure_redis(os.environ.get("PLUGINPOOL_REDIS_URL"), run_dir=run_dir)
    url = with_db(reachable.url, BENCH_DB)
    redis.Redis.from_url(url).flushdb()
    return url


def private_redis(run_dir: Path) -> tuple[ManagedProcess, str]:
    """A redis-server of the benchmark's own on a free loopback port: exact command counts,
    nothing else talking to it. Stop it by PID (`.stop()`)."""
    port = free_port()
    proc = ManagedProcess(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                           "--save", "", "--appendonly", "no", "--dir", str(run_dir)],
                          log_path=run_dir / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    if not wait_until(lambda: ping(url), timeout_s=20):
        proc.stop()
        sys.exit(proc.log_text())
    return proc, url


def start(argv: list[str], env: dict[str, str], log: Path,
          ready: Callable[[], bool], *, timeout_s: float = 60) -> ManagedProcess:
    proc = ManagedProcess(argv, env=env, log_path=log, cwd=str(ROOT / "bench"))
    if (not wait_until(lambda: not proc.alive() or ready(), timeout_s=timeout_s)
            or not proc.alive()):
        proc.stop()
        sys.exit(f"process did not start: {argv}\n{proc.log_text()[-3000:]}")
    return proc


def pluginpool_worker(client: Any, env: dict[str, str], run_dir: Path, *, plugins: str,
                      concurrency: int, node: str, timeout_s: float = 60) -> ManagedProcess:
    """A `pluginpool worker` for the given plugins, started and answering pings."""
    argv = [sys.executable, "-m", "pluginpool.pool.tools.cli", "worker", "--plugins", plugins,
            "--concurrency", str(concurrency), "--name", node, "--loglevel", "WARNING"]
    return start(argv, env, run_dir / f"{node}.log", lambda: bool(
        client.app.control.ping(destination=[node], timeout=0.5)), timeout_s=timeout_s)


def plain_celery_worker(client: Any, env: dict[str, str], run_dir: Path, *,
                        concurrency: int, node: str) -> ManagedProcess:
    """A plain `celery worker` for bench/plain_app.py's no-op task."""
    argv = [sys.executable, "-m", "celery", "-A", "plain_app", "worker", "-c", str(concurrency),
            "-Q", "bench.plain", "-n", node, "--without-mingle", "--without-gossip",
            "--loglevel=WARNING"]
    return start(argv, env, run_dir / f"{node}.log", lambda: bool(
        client.app.control.ping(destination=[node], timeout=0.5)))


def plain_round(app: Any, jobs: int) -> None:
    """Enqueue N plain Celery no-op jobs, then wait for each result."""
    results = [app.send_task("bench.noop", args=[{"i": i}], queue="bench.plain")
               for i in range(jobs)]
    for result in results:
        result.get(timeout=120)


def pluginpool_round(client: Any, plugin_id: str, jobs: int,
                     payload: Callable[[int], Any] = lambda i: {"i": i}) -> None:
    """Submit N jobs through PluginClient, then wait for each result."""
    submitted = [client.submit(plugin_id, payload(i)) for i in range(jobs)]
    for job in submitted:
        job.result(timeout=120)


def timed(run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def write_result(name: str, result: dict[str, object]) -> None:
    path = ROOT / "bench" / "results" / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
