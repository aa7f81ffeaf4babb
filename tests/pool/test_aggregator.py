"""The health aggregator with real Redis, workers, Celery events and HTTP."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pluginpool.policy.errors import PluginExecutionError
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.pool.tools.redis_bootstrap import free_port
from pluginpool.tasks.client import PluginClient
from tests.conftest import TEST_PLUGINS, make_settings, retire, spawn_worker, worker_env


class Aggregator:
    def __init__(self, client: PluginClient, log_dir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = ManagedProcess(
            [sys.executable, "-m", "pluginpool.pool.tools.cli", "aggregator",
             "--port", str(self.port)],
            env=worker_env(client.settings), log_path=log_dir / f"aggregator-{self.port}.log")
        assert wait_until(self.ready, timeout_s=30), self.proc.log_text()

    def ready(self) -> bool:
        try:
            return bool(self.get("/livez")["events_connected"])
        except (OSError, ValueError):
            return False

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=10) as response:
            body = response.read()
        return json.loads(body) if not path.startswith("/metrics") else body.decode()

    def text(self, path: str) -> str:
        with urllib.request.urlopen(self.base + path, timeout=10) as response:
            return str(response.read().decode())


@pytest.fixture(scope="module")
def env(redis_url: str, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[PluginClient, ManagedProcess, Path]]:
    settings = make_settings(redis_url, key_prefix=f"pphealth:{uuid.uuid4().hex[:8]}:",
                             default_breaker={"minimum_calls": 10_000,
                                              "open_at_once_types": []},
                             health={"minimum_runs": 5, "degraded_error_rate": 0.2},
                             worker_heartbeat_s=1.0)
    client = PluginClient(settings)
    client.register(TEST_PLUGINS / "health_plugins.toml")
    logs = tmp_path_factory.mktemp("health")
    worker = spawn_worker(client, logs, plugins="hl-good,hl-flaky,hl-missing", concurrency=2)
    yield client, worker, logs
    retire(worker)
    client.close()


@pytest.fixture
def aggregator(env: tuple[PluginClient, ManagedProcess, Path]) -> Iterator[Aggregator]:
    agg = Aggregator(env[0], env[2])
    yield agg
    retire(agg.proc)


def health_of(agg: Aggregator, plugin: str) -> dict[str, Any]:
    return dict(agg.get(f"/health/{plugin}"))


def eventually(check: Callable[[], bool], timeout_s: float = 20) -> None:
    assert wait_until(check, timeout_s=timeout_s, interval_s=0.2)


def test_status_transitions_with_reasons(env: Any, aggregator: Aggregator,
                                         tmp_path: Path) -> None:
    client = env[0]
    for i in range(5):
        client.submit("hl-good", i).result(timeout=20)
    good = health_of(aggregator, "hl-good")
    assert good["status"] == "healthy" and good["reasons"] == []
    assert good["runs"] == 5 and good["workers"] == [env[1].nodename]

    orphan = health_of(aggregator, "hl-orphan")
    assert orphan["status"] == "unhealthy"
    assert "no live worker consumes the plugin's queue" in orphan["reasons"]

    with pytest.raises(PluginExecutionError):
        client.submit("hl-missing", {}).result(timeout=20)
    missing = health_of(aggregator, "hl-missing")
    assert missing["status"] == "unhealthy"
    assert missing["reasons"] == ["a dependency error stands (no success since)"]

    flag = tmp_path / "broken"
    flag.write_text("1")
    for _ in range(6):
        with pytest.raises(PluginExecutionError):
            client.submit("hl-flaky", {"flag": str(flag)}).result(timeout=20)
    flaky = health_of(aggregator, "hl-flaky")
    assert flaky["status"] == "degraded"
    assert flaky["reasons"][0].startswith("error rate 100%")
    assert flaky["failures"] == {"runtime": 6}
    assert flaky["last_errors"][0]["type"] == "runtime"

    client.override_breaker("hl-good", "force_open")
    forced = health_of(aggregator, "hl-good")
    assert forced["status"] == "unhealthy"
    assert forced["reasons"] == ["circuit breaker is open"]
    client.override_breaker("hl-good", "reset")
    assert health_of(aggregator, "hl-good")["status"] == "healthy"


def test_counts_are_exact_across_an_aggregator_kill_and_two_replicas(
        env: Any, aggregator: Aggregator) -> None:
    client = env[0]
    before = health_of(aggregator, "hl-good")["runs"]
    jobs = [client.submit("hl-good", i) for i in range(150)]
    aggregator.proc.signal(9)  # killed mid-stream: no chance to flush anything
    jobs += [client.submit("hl-good", i) for i in range(150)]
    for job in jobs:
        job.result(timeout=60)
    restarted = Aggregator(client, env[2])
    second = Aggregator(client, env[2])
    try:
        first_view = health_of(restarted, "hl-good")
        second_view = health_of(second, "hl-good")
        assert first_view["runs"] == before + 300
        assert first_view["succeeded"] == second_view["succeeded"] == first_view["runs"]
        for field in ("runs", "failures", "restarts", "latency_buckets", "usage"):
            assert first_view[field] == second_view[field], field
    finally:
        retire(restarted.proc, second.proc)


def test_metrics_parse_with_prometheus_clients_own_parser(env: Any,
                                                          aggregator: Aggregator) -> None:
    env[0].submit("hl-good", 1).result(timeout=20)
    families = {f.name: f for f in text_string_to_metric_families(aggregator.text("/metrics"))}
    runs = {s.labels["plugin"]: s.value for s in families["pluginpool_plugin_runs"].samples
            if s.name.endswith("_total")}
    assert runs["hl-good"] >= 1
    histogram = families["pluginpool_plugin_run_duration_ms"]
    buckets = [s for s in histogram.samples
               if s.name.endswith("_bucket") and s.labels["plugin"] == "hl-good"]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == runs["hl-good"]
    status = {(s.labels["plugin"], s.labels["status"]): s.value
              for s in families["pluginpool_plugin_status"].samples}
    assert status[("hl-orphan", "unhealthy")] == 1.0
    breaker = families["pluginpool_breaker_state"].samples
    assert {s.labels["state"] for s in breaker} == {"closed", "open", "half_open"}
    client = env[0]
    client.redis.lpush("plugins.hl-good", "not a message")  # dead-lettered by the worker
    eventually(lambda: _sample(aggregator, "pluginpool_dead_letters") >= 1, 10)
    assert _sample(aggregator, "pluginpool_delivery_late_acks_total") >= 0
    assert _sample(aggregator, "pluginpool_delivery_rescued_total") >= 0


def _sample(aggregator: Aggregator, name: str) -> float:
    for family in text_string_to_metric_families(aggregator.text("/metrics")):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not in /metrics")


def test_a_stopped_worker_makes_its_plugin_unhealthy(env: Any, aggregator: Aggregator) -> None:
    client, _, logs = env
    client.register(client.spec("hl-good").model_copy(update={"id": "hl-solo"}))
    solo = spawn_worker(client, logs, plugins="hl-solo", concurrency=1)
    client.submit("hl-solo", 1).result(timeout=20)
    assert health_of(aggregator, "hl-solo")["status"] == "healthy"
    solo.stop()
    eventually(lambda: health_of(aggregator, "hl-solo")["status"] == "unhealthy", 10)
    assert "no live worker" in health_of(aggregator, "hl-solo")["reasons"][0]


def test_unknown_plugin_is_a_404(aggregator: Aggregator) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        aggregator.get("/health/ghost")
    assert info.value.code == 404


def test_client_health_and_cli_agree_with_the_api(env: Any, aggregator: Aggregator) -> None:
    client = env[0]
    from_client = client.health("hl-good")
    cli = subprocess.run([sys.executable, "-m", "pluginpool.pool.tools.cli", "health", "hl-good",
                          "--json"], env=worker_env(client.settings), capture_output=True,
                         text=True, timeout=30, check=False)
    from_cli = json.loads(cli.stdout)
    from_api = health_of(aggregator, "hl-good")
    assert from_client.runs == from_cli["runs"] == from_api["runs"]  # type: ignore[union-attr]
    table = subprocess.run([sys.executable, "-m", "pluginpool.pool.tools.cli", "health"],
                           env=worker_env(client.settings), capture_output=True, text=True,
                           timeout=30, check=False)
    assert table.returncode == 0 and "hl-good" in table.stdout


def test_check_health_exit_codes(env: Any) -> None:
    client, worker, _ = env

    def check(*args: str) -> int:
        return subprocess.run([sys.executable, "-m", "pluginpool.pool.tools.cli", "check-health",
                               *args], env=worker_env(client.settings), capture_output=True,
                              timeout=30, check=False).returncode

    assert check() == 0
    assert check("--worker", worker.nodename) == 0
    assert check("--worker", "nobody@nowhere") == 1
    assert check("--plugin", "hl-orphan") == 1
    dead = {**worker_env(client.settings), "PLUGINPOOL_REDIS_URL": "redis://127.0.0.1:1/0",
            "PLUGINPOOL_REDIS_SOCKET_TIMEOUT_S": "1"}
    assert subprocess.run([sys.executable, "-m", "pluginpool.pool.tools.cli", "check-health"],
                          env=dead, capture_output=True, timeout=30,
                          check=False).returncode == 1


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: `make test` installs Debian's chromium")
    return path


def dump_dom(url: str, *, virtual_ms: int, profile: Path) -> str:
    """The page's DOM after `virtual_ms` of page time; the profile goes in the test's own
    directory (one under /tmp was left behind by every run)."""
    done = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}",
         f"--virtual-time-budget={virtual_ms}", "--dump-dom", url],
        capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def tab_titles(debug_port: int) -> list[str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json/list",
                                    timeout=5) as response:
            return [str(tab.get("title", "")) for tab in json.loads(response.read())]
    except (OSError, ValueError):
        return []


def test_dashboard_in_headless_chromium(env: Any, aggregator: Aggregator,
                                        tmp_path: Path) -> None:
    """The page loads, shows every plugin, and, in the same open page, turns a plugin's
    status from healthy to degraded when it starts failing (watched through the tab title
    that the page keeps up to date, read from Chromium's DevTools HTTP endpoint)."""
    client = env[0]
    client.register(client.spec("hl-flaky").model_copy(update={"id": "hl-dash"}))
    dash_worker = spawn_worker(client, env[2], plugins="hl-dash", concurrency=1)
    debug_port = free_port()
    browser: ManagedProcess | None = None
    try:
        flag = tmp_path / "dash-broken"
        for i in range(5):
            client.submit("hl-dash", {"flag": str(flag), "i": i}).result(timeout=20)
        dom = dump_dom(aggregator.base + "/", virtual_ms=5000,
                       profile=tmp_path / "chromium-dump")
        assert 'data-plugin="hl-dash" data-status="healthy"' in dom
        assert 'data-plugin="hl-good"' in dom and 'data-plugin="hl-orphan"' in dom
        assert "memory vs limit" in dom and "<svg" in dom
        browser = ManagedProcess(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}",
             f"--remote-debugging-port={debug_port}", aggregator.base + "/"],
            log_path=tmp_path / "chromium.log")
        eventually(lambda: any("hl-dash=healthy" in t for t in tab_titles(debug_port)), 60)
        flag.write_text("1")
        for i in range(6):
            with pytest.raises(PluginExecutionError):
                client.submit("hl-dash", {"flag": str(flag), "i": i}).result(timeout=20)
        eventually(lambda: any("hl-dash=degraded" in t for t in tab_titles(debug_port)), 30)
    finally:
        if browser is not None:
            browser.stop()
        retire(dash_worker)


def test_health_is_paged_for_people_reading_many_plugins(env: Any,
                                                          aggregator: Aggregator) -> None:
    """`/health?offset=&limit=`: a page of plugins in id order and the total; a malformed
    query is a 400, not a server error."""
    whole = aggregator.get("/health")
    ids = sorted(item["plugin_id"] for item in whole["plugins"])
    assert whole["total"] == len(ids) >= 3
    page = aggregator.get("/health?offset=1&limit=2")
    assert [item["plugin_id"] for item in page["plugins"]] == ids[1:3]
    assert page["total"] == len(ids) and page["offset"] == 1
    with pytest.raises(urllib.error.HTTPError) as info:
        aggregator.get("/health?limit=many")
    assert info.value.code == 400
