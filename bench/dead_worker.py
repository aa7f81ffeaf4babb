"""A dead worker's jobs come back in seconds: time from SIGKILL to the last of its jobs
completing elsewhere, with the default (one hour) visibility timeout, over repeated kills;
and duplicate runs per 1,000 jobs.

Two workers (2 processes each) share a queue of 50 ms jobs; one is SIGKILLed (its whole
process group, as the OOM killer or a lost node would) mid-stream, the jobs it held at that
instant are read from its unacknowledged record, and the time until each has a result is
measured. The killed worker is replaced and the round repeats.
Run: `python -m bench.dead_worker` (or `make bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import redis

from bench.common import ROOT, pluginpool_worker, private_redis, write_result
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec

JOB_S = 0.05


def held_job_ids(store: redis.Redis, keys_prefix: str, pid: int) -> list[str]:
    """The job ids a worker process held unacknowledged: its consumer's held hash."""
    held: list[str] = []
    for key in store.scan_iter(f"{keys_prefix}delivery:held:*"):
        consumer = key.decode().rsplit(":held:", 1)[1]
        if consumer.split(":")[1] != str(pid):
            continue
        for tag in store.hkeys(key):
            entry = store.hget("unacked", tag)
            if entry:
                held.append(json.loads(entry)[0]["headers"]["id"])
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=300)
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="pluginpool-bench-dead-"))
    server, url = private_redis(run_dir)
    store = redis.Redis.from_url(url)
    settings = Settings(_env_file=None, redis_url=url,  # type: ignore[call-arg]
                        plugin_paths=[str(ROOT / "bench")])
    assert settings.visibility_timeout_s == 3600
    client = PluginClient(settings)
    client.register(PluginSpec.model_validate({
        "id": "counted", "name": "counted", "entrypoint": "bench_plugins:count_and_sleep",
        "isolation": {"sandboxed": False}, "resource_limits": {"timeout_ms": 10_000},
        "breaker": {"minimum_calls": 1_000_000}}))
    env = {**os.environ, "PLUGINPOOL_REDIS_URL": url,
           "PLUGINPOOL_PLUGIN_PATHS": json.dumps(settings.plugin_paths)}
    recovery: list[float] = []
    held_counts: list[int] = []
    total_jobs = 0
    key = "bench:executions"
    survivor = pluginpool_worker(client, env, run_dir, plugins="counted", concurrency=2,
                                 node="survivor@localhost")
    try:
        for round_no in range(args.rounds):
            victim = pluginpool_worker(client, env, run_dir, plugins="counted", concurrency=2,
                                       node=f"victim{round_no}@localhost")
            jobs = [client.submit("counted", {"redis_url": url, "key": key, "n": i,
                                              "seconds": JOB_S}) for i in range(args.jobs)]
            total_jobs += len(jobs)
            time.sleep(1.0)
            held = held_job_ids(store, settings.key_prefix, victim.pid)
            os.killpg(victim.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            victim.stop()
            by_id = {job.id: job for job in jobs}
            pending = set(held)
            while pending and time.monotonic() - killed_at < 300:
                pending = {job_id for job_id in pending if not by_id[job_id].ready()}
                time.sleep(0.05)
            recovery.append(time.monotonic() - killed_at)
            held_counts.append(len(held))
            for job in jobs:
                job.result(timeout=300)
    finally:
        survivor.stop()
        client.close()
        executions = [int(v) for v in store.hvals(key)]
        server.stop()
    duplicates = sum(count - 1 for count in executions)
    write_result("dead_worker", {
        "benchmark": "SIGKILL of one of two workers mid-stream (default visibility timeout "
                     f"3600 s); {JOB_S * 1000:.0f} ms jobs",
        "rounds": args.rounds, "jobs_per_round": args.jobs,
        "jobs_held_by_the_killed_worker": held_counts,
        "kill_to_last_held_job_done_s": [round(r, 2) for r in recovery],
        "p50_s": round(statistics.median(recovery), 2), "max_s": round(max(recovery), 2),
        "duplicates_per_1000_jobs": round(1000 * duplicates / max(total_jobs, 1), 2)})


if __name__ == "__main__":
    main()
