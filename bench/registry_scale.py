"""How the costs a person or a scraper sees grow with the plugin count: registry, spec
cache, health, and the aggregator's /health, paged /health and /metrics, for 100, 1,000
and 10,000 registered plugins (no worker: the figures are the reading side's).
Run: `python -m bench.registry_scale` (or `make bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import ROOT, private_redis, write_result
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.pool.tools.redis_bootstrap import free_port
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.registry import SpecCache
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec


def timed_get(url: str) -> tuple[float, int]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as response:
        body = response.read()
    return round((time.perf_counter() - started) * 1000, 1), len(body)


def one_point(url: str, run_dir: Path, plugins: int) -> dict[str, object]:
    settings = Settings(_env_file=None, redis_url=url,  # type: ignore[call-arg]
                        plugin_paths=[str(ROOT / "bench")])
    client = PluginClient(settings)
    client.redis.flushall()
    specs = [PluginSpec.model_validate({"id": f"p{i:05d}", "name": f"p{i:05d}",
                                        "entrypoint": "bench_plugins:noop"})
             for i in range(plugins)]
    figures: dict[str, object] = {}
    started = time.perf_counter()
    client.register(specs)
    figures["register_all_ms"] = round((time.perf_counter() - started) * 1000, 1)
    started = time.perf_counter()
    client.registry.all()
    figures["registry_all_ms"] = round((time.perf_counter() - started) * 1000, 1)
    cache = SpecCache(client.registry, ttl_s=5)
    started = time.perf_counter()
    cache.get(specs[-1].id)
    figures["spec_cache_cold_get_ms"] = round((time.perf_counter() - started) * 1000, 2)
    started = time.perf_counter()
    client.health()
    figures["client_health_all_ms"] = round((time.perf_counter() - started) * 1000, 1)
    port = free_port()
    env = {**os.environ, "PLUGINPOOL_REDIS_URL": url}
    aggregator = ManagedProcess([sys.executable, "-m", "pluginpool.pool.tools.cli", "aggregator",
                                 "--port", str(port)], env=env,
                                log_path=run_dir / f"aggregator-{plugins}.log")
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_until(lambda: _up(base), timeout_s=60):
            raise SystemExit(aggregator.log_text())
        for name, path in (("health", "/health"), ("health_page_50", "/health?limit=50"),
                           ("metrics", "/metrics"), ("dashboard", "/")):
            ms, size = timed_get(base + path)
            figures[f"{name}_ms"], figures[f"{name}_bytes"] = ms, size
    finally:
        aggregator.stop()
        client.close()
    return figures


def _up(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/livez", timeout=2) as response:
            return bool(json.loads(response.read()))
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plugins", default="100,1000,10000")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="pluginpool-bench-scale-"))
    server, url = private_redis(run_dir)
    try:
        points = {n: one_point(url, run_dir, int(n)) for n in args.plugins.split(",")}
    finally:
        server.stop()
    write_result("registry_scale", {
        "benchmark": "reading side with N registered plugins, no worker, private redis-server",
        "points": points})


if __name__ == "__main__":
    main()
