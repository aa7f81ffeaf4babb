"""A live fleet: how long a running worker takes to serve a plugin registered after it
started, and a reload under load.

1. Register → first job served: one `pluginpool worker --plugins 'fleet-*'` already running
   with nothing registered; each round registers a new plugin (its code a published
   artifact, no plugin path), submits one job and waits for its result. The first round
   also fetches and unpacks the artifact; later rounds share it (same sha256). Both the
   sandboxed (warm sandbox: a zygote starts per revision) and the in-pool path.
2. Reload under load: N jobs streaming on one plugin, a new revision registered half-way:
   failed jobs, and how long after the register until every job runs the new revision.
Run: `python -m bench.fleet [--rounds 10] [--jobs 2000]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import bench_redis_url, pluginpool_worker, write_result
from pluginpool.policy.errors import PluginExecutionError
from pluginpool.tasks.artifacts import build_wheel
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec

CODE = "def run(ctx, payload):\n    return {'version': VERSION}\n"


def wheel(root: Path, version: int) -> str:
    package = root / f"v{version}" / "fleetbench"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"VERSION = {version}\n" + CODE)
    work = root / f"build-v{version}"
    work.mkdir()
    return str(build_wheel(package, plugin_id="fleet", version=f"{version}.0", work_dir=work))


def spec(plugin_id: str, source: str, *, sandboxed: bool, version: str = "1.0") -> PluginSpec:
    return PluginSpec(id=plugin_id, name=plugin_id, version=version,
                      entrypoint="fleetbench:run", source=source,
                      isolation={"sandboxed": sandboxed})  # type: ignore[arg-type]


def register_to_served(client: PluginClient, source: str, rounds: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for sandboxed in (True, False):
        samples = []
        for n in range(rounds):
            plugin_id = f"fleet-{'sb' if sandboxed else 'ip'}-{n}"
            started = time.perf_counter()
            client.register(spec(plugin_id, source, sandboxed=sandboxed))
            client.submit(plugin_id, {}).result(timeout=60)
            samples.append((time.perf_counter() - started) * 1000)
        out["sandboxed" if sandboxed else "in_pool"] = {
            "p50_ms": round(statistics.median(samples), 1), "max_ms": round(max(samples), 1),
            "first_ms": round(samples[0], 1), "samples_ms": [round(s, 1) for s in samples]}
    return out


def reload_under_load(client: PluginClient, sources: dict[int, str], jobs: int
                      ) -> dict[str, object]:
    client.register(spec("fleet-load", sources[1], sandboxed=True))
    client.submit("fleet-load", {}).result(timeout=60)
    submitted, switched_at = [], 0.0
    for n in range(jobs):
        if n == jobs // 2:
            client.register(spec("fleet-load", sources[2], sandboxed=True, version="2.0"))
            switched_at = time.perf_counter()
        submitted.append((client.submit("fleet-load", {}), time.perf_counter()))
    failed, last_old = 0, 0.0
    for job, sent_at in submitted:
        try:
            value = job.result(timeout=120)
        except PluginExecutionError:
            failed += 1
            continue
        if value["version"] == 1 and sent_at > switched_at:
            last_old = max(last_old, sent_at - switched_at)
    return {"jobs": jobs, "failed": failed,
            "last_old_revision_job_sent_after_register_ms": round(last_old * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="pp-bench-fleet-"))
    url = bench_redis_url(run_dir)
    settings = Settings(_env_file=None, redis_url=url,  # type: ignore[call-arg]
                        artifact_cache_dir=str(run_dir / "cache"))
    env = {**os.environ, "PLUGINPOOL_REDIS_URL": url, "PLUGINPOOL_PLUGIN_PATHS": "[]",
           "PLUGINPOOL_ARTIFACT_CACHE_DIR": str(run_dir / "cache")}
    sources = {version: wheel(run_dir, version) for version in (1, 2)}
    with PluginClient(settings) as client:
        worker = pluginpool_worker(client, env, run_dir, plugins="fleet-*", concurrency=2,
                                   node="bench-fleet@localhost")
        try:
            result = {"register_to_first_job": register_to_served(client, sources[1],
                                                                  args.rounds),
                      "reload_under_load": reload_under_load(client, sources, args.jobs)}
        finally:
            worker.stop()
    result["note"] = json.dumps({"rounds": args.rounds, "concurrency": 2})
    write_result("fleet", result)


if __name__ == "__main__":
    main()
