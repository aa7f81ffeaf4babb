"""Horizontal scaling: throughput of an I/O-bound plugin (it sleeps 50 ms) with 1, 2 and 4
worker processes on this machine, sandboxed and not, in one run.
Run: `python -m bench.scaling` (or `make bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from bench.common import (
    ROOT,
    bench_redis_url,
    pluginpool_round,
    pluginpool_worker,
    timed,
    write_result,
)
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec

SLEEP_S = 0.05


def spec(plugin_id: str, *, sandboxed: bool) -> PluginSpec:
    return PluginSpec.model_validate({
        "id": plugin_id, "name": plugin_id, "entrypoint": "bench_plugins:sleep",
        "isolation": {"sandboxed": sandboxed}, "resource_limits": {"timeout_ms": 10_000}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--processes", default="1,2,4")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="pluginpool-bench-"))
    url = bench_redis_url(run_dir)
    settings = Settings(_env_file=None, redis_url=url,  # type: ignore[call-arg]
                        plugin_paths=[str(ROOT / "bench")])
    client = PluginClient(settings)
    specs = {"sandboxed": spec("sleep-sandboxed", sandboxed=True),
             "in_pool": spec("sleep-in-pool", sandboxed=False)}
    client.register(list(specs.values()))
    env = {**os.environ, "PLUGINPOOL_REDIS_URL": url,
           "PLUGINPOOL_PLUGIN_PATHS": json.dumps(settings.plugin_paths)}
    figures: dict[str, dict[str, float]] = {mode: {} for mode in specs}
    for mode, plugin in specs.items():
        for processes in (int(p) for p in args.processes.split(",")):
            node = f"bench-scale-{mode}-{processes}@localhost"
            proc = pluginpool_worker(client, env, run_dir, plugins=plugin.id,
                                     concurrency=processes, node=node)
            elapsed = timed(lambda p=plugin.id: pluginpool_round(
                client, p, args.jobs, payload=lambda _: {"seconds": SLEEP_S}))
            proc.stop()
            figures[mode][str(processes)] = round(args.jobs / elapsed, 1)
    ideal = {str(p): round(int(p) / SLEEP_S, 1) for p in args.processes.split(",")}
    write_result("scaling", {
        "benchmark": f"I/O-bound plugin (sleeps {SLEEP_S * 1000:.0f} ms), N jobs per point",
        "jobs": args.jobs, "jobs_per_s": figures, "ideal_jobs_per_s": ideal})
    client.close()


if __name__ == "__main__":
    main()
