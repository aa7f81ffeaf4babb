"""Helpers shared by the benchmarks: a Redis database of their own, workers started by PID."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

from pluginpool.pool.processes import ManagedProcess, wait_until
from pluginpool.pool.redis_bootstrap import ensure_redis, with_db

BENCH_DB = int(os.environ.get("PLUGINPOOL_BENCH_REDIS_DB", "12"))
ROOT = Path(__file__).resolve().parent.parent


def bench_redis_url(run_dir: Path) -> str:
    reachable = ensure_redis(os.environ.get("PLUGINPOOL_REDIS_URL"), run_dir=run_dir)
    url = with_db(reachable.url, BENCH_DB)
    redis.Redis.from_url(url).flushdb()
    return url


def start(argv: list[str], env: dict[str, str], log: Path,
          ready: Callable[[], bool]) -> ManagedProcess:
    proc = ManagedProcess(argv, env=env, log_path=log, cwd=str(ROOT / "bench"))
    if not wait_until(lambda: not proc.alive() or ready(), timeout_s=60) or not proc.alive():
        proc.stop()
        sys.exit(f"process did not start: {argv}\n{proc.log_text()[-3000:]}")
    return proc


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
