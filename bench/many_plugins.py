"""A thousand plugins cost what one does: throughput and idle Redis load by plugin count.

For 1, 1,000 and 10,000 registered no-op plugins (unsandboxed), each on a private
`redis-server` of its own with one worker (`--plugins all`, 2 processes), batches of jobs
spread at random over the plugins run in turn on each setup, round after round: the setups
are measured side by side, so a change of load on the machine touches them all alike (the
figure is the median per setup, the ratio the median of the per-round ratios). Then, idle,
each worker's Redis commands per second are counted (nothing else talks to its server).
Fairness: one plugin with a deep backlog and 100 others with 10 jobs each.
Run: `python -m bench.many_plugins` (or `make bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.common import ROOT, pluginpool_worker, private_redis, write_result
from bench.job_whereabouts import describe, whereabouts
from pluginpool.policy.errors import JobWaitTimeoutError
from pluginpool.pool.tools.processes import ManagedProcess
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec

IDLE_S = 10.0
WAIT_S = 300.0
"""How long a batch waits for one job's outcome before it says where the job is."""


def noop(plugin_id: str) -> PluginSpec:
    return PluginSpec.model_validate({
        "id": plugin_id, "name": plugin_id, "entrypoint": "bench_plugins:noop",
        "isolation": {"sandboxed": False}, "resource_limits": {"timeout_ms": 10_000}})


def commands(store: redis.Redis) -> int:
    return int(store.info("stats")["total_commands_processed"])


def bench_env(url: str, settings: Settings) -> dict[str, str]:
    return {**os.environ, "PLUGINPOOL_REDIS_URL": url, "PLUGINPOOL_BREAKER_ENABLED": "false",
            "PLUGINPOOL_USAGE_EVENTS": "false",
            "PLUGINPOOL_PLUGIN_PATHS": json.dumps(settings.plugin_paths)}


def bench_settings(url: str) -> Settings:
    return Settings(_env_file=None, redis_url=url, breaker_enabled=False,  # type: ignore[call-arg]
                    usage_events=False, plugin_paths=[str(ROOT / "bench")])


@dataclass
class Setup:
    """One plugin count: its own Redis server, registry and worker."""

    plugins: int
    server: ManagedProcess
    store: redis.Redis
    client: PluginClient
    worker: ManagedProcess
    ids: list[str]
    register_s: float
    worker_start_s: float
    run_dir: Path

    @classmethod
    def start(cls, run_dir: Path, plugins: int) -> Setup:
        own_dir = run_dir / f"n{plugins}"
        own_dir.mkdir()
        server, url = private_redis(own_dir)
        settings = bench_settings(url)
        client = PluginClient(settings)
        ids = [f"p{i:05d}" for i in range(plugins)]
        started = time.perf_counter()
        client.register([noop(pid) for pid in ids])
        register_s = time.perf_counter() - started
        started = time.perf_counter()
        worker = pluginpool_worker(client, bench_env(url, settings), own_dir, plugins="all",
                                   concurrency=2, node=f"bench-many-{plugins}@localhost",
                                   timeout_s=900)
        return cls(plugins, server, redis.Redis.from_url(url), client, worker, ids,
                   register_s, time.perf_counter() - started, own_dir)

    def batch(self, rng: random.Random, jobs: int) -> float:
        """Jobs per second for one batch spread at random over the plugins."""
        started = time.perf_counter()
        submitted = [self.client.submit(rng.choice(self.ids), i) for i in range(jobs)]
        for job in submitted:
            try:
                job.result(timeout=WAIT_S)
            except JobWaitTimeoutError:
                self.explain_missing(submitted)
                raise
        return jobs / (time.perf_counter() - started)

    def explain_missing(self, submitted: list[Any]) -> None:
        """Say where every job without an outcome is (queued, indexed, held, dead-lettered,
        or done and missed by the waiter), on stderr and in the run's directory."""
        keys = self.client.settings.keys
        lines = [describe(whereabouts(self.store, keys, job_id=job.id,
                                      queue=f"plugins.{job.plugin_id}"))
                 for job in submitted if not job.ready()]
        report = (f"{len(lines)} job(s) without an outcome after {WAIT_S:.0f} s, "
                  f"{self.plugins} plugins (worker log: {self.worker.log_path}):\n"
                  + "\n".join(lines) + "\n" + self.worker_state())
        print(report, file=sys.stderr)
        (self.run_dir / "missing-jobs.txt").write_text(report + "\n")

    def worker_state(self) -> str:
        """What the worker is doing: each Redis connection's last command and idle time
        (the consumer's claim or wait among them), and its main process's stacks when
        py-spy is installed (it is not a dependency)."""
        lines = ["connections:"]
        for conn in self.store.client_list():
            lines.append(" ".join(f"{key}={conn.get(key)}" for key in (
                "id", "name", "age", "idle", "cmd", "sub", "psub", "multi", "qbuf", "oll")))
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if Path(spy).exists():
            dump = subprocess.run([spy, "dump", "--pid", str(self.worker.pid)],
                                  capture_output=True, text=True, timeout=60, check=False)
            lines += ["main process stacks (py-spy):", dump.stdout[-20_000:], dump.stderr[-2_000:]]
        return "\n".join(lines)

    def idle_commands_per_s(self) -> float:
        before = commands(self.store)
        time.sleep(IDLE_S)
        return (commands(self.store) - before - 1) / IDLE_S

    def stop(self) -> None:
        self.worker.stop()
        self.client.close()
        self.server.stop()


def fairness(run_dir: Path, backlog: int, others: int, each: int) -> dict[str, float]:
    own_dir = run_dir / "fairness"
    own_dir.mkdir()
    server, url = private_redis(own_dir)
    settings = bench_settings(url)
    client = PluginClient(settings)
    store = redis.Redis.from_url(url)
    client.register([noop("deep")] + [noop(f"o{i:03d}") for i in range(others)])
    deep = [client.submit("deep", i) for i in range(backlog)]
    worker = pluginpool_worker(client, bench_env(url, settings), own_dir, plugins="all",
                               concurrency=2, node="bench-fair@localhost")
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
        server.stop()
    return {"others_done_s": round(others_s, 2), "backlog_left_when_others_done": left,
            "backlog_done_s": round(backlog_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=500, help="jobs per batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--plugins", default="1,1000,10000")
    parser.add_argument("--no-fairness", action="store_true")
    args = parser.parse_args()
    counts = [int(n) for n in args.plugins.split(",")]
    run_dir = Path(tempfile.mkdtemp(prefix="pluginpool-bench-many-"))
    setups: list[Setup] = []
    try:
        for count in counts:
            setups.append(Setup.start(run_dir, count))
        rng = random.Random(1)
        for setup in setups:  # warm-up: every pool process meets its first tasks
            setup.batch(rng, args.jobs)
        rates: dict[int, list[float]] = {s.plugins: [] for s in setups}
        for _ in range(args.rounds):
            for setup in setups:
                rates[setup.plugins].append(setup.batch(rng, args.jobs))
        time.sleep(2)
        idle = {s.plugins: s.idle_commands_per_s() for s in setups}
        points = {str(s.plugins): {
            "jobs_per_s_median": round(statistics.median(rates[s.plugins]), 1),
            "jobs_per_s_all": [round(r, 1) for r in rates[s.plugins]],
            "idle_commands_per_s": round(idle[s.plugins], 1),
            "register_s": round(s.register_s, 2),
            "worker_start_s": round(s.worker_start_s, 1)} for s in setups}
    finally:
        for setup in setups:
            setup.stop()
    base = counts[0]
    ratios = {str(n): round(statistics.median(
        [r / b for r, b in zip(rates[n], rates[base], strict=True)]), 2) for n in counts}
    result = {
        "benchmark": "no-op jobs spread at random over N registered plugins; per N a private "
                     "redis-server and one worker (--plugins all, 2 processes); batches run "
                     "in turn on every setup, round after round; idle Redis commands/s",
        "jobs_per_batch": args.jobs, "rounds": args.rounds, "points": points,
        "ratio_to_first_median_of_rounds": ratios}
    if not args.no_fairness:
        result["fairness_backlog_10000_others_100x10"] = fairness(
            run_dir, backlog=10_000, others=100, each=10)
    write_result("many_plugins", result)


if __name__ == "__main__":
    main()
