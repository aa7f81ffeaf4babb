"""The breaker on the real path: producers, workers, fallbacks, events, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pluginpool.policy.breaker import CircuitBreaker
from pluginpool.policy.errors import (
    BreakerUnavailableError,
    CircuitOpenError,
    PluginExecutionError,
)
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.jobs import FallbackJob, Job
from tests.conftest import TEST_PLUGINS, make_settings, retire, spawn_worker, worker_env
from tests.unreachable import unreachable_redis


@pytest.fixture(scope="module")
def env(redis_url: str, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[PluginClient, ManagedProcess]]:
    settings = make_settings(redis_url, key_prefix=f"ppbe2e:{uuid.uuid4().hex[:8]}:")
    client = PluginClient(settings)
    client.register(TEST_PLUGINS / "breaker_plugins.toml")
    worker = spawn_worker(client, tmp_path_factory.mktemp("breaker"), concurrency=2)
    yield client, worker
    retire(worker)
    client.close()


def producer_script(client: PluginClient, code: str, tmp_path: Path) -> subprocess.Popen[str]:
    """Another producer process, with its own PluginClient on the same settings."""
    script = tmp_path / f"producer-{uuid.uuid4().hex[:6]}.py"
    script.write_text(
        "import json, sys, time\n"
        "from pluginpool.tasks.client import PluginClient\n"
        "client = PluginClient.from_env()\n" + code)
    return subprocess.Popen([sys.executable, str(script)], env=worker_env(client.settings),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_backlog_fails_fast_once_open_and_a_second_producer_sees_it(
        env: tuple[PluginClient, ManagedProcess], tmp_path: Path) -> None:
    client, _ = env
    started = time.monotonic()
    jobs = [client.submit("brk-fails", i) for i in range(40)]
    outcomes: dict[str, int] = {"ran": 0, "refused": 0}
    for job in jobs:
        try:
            job.result(timeout=60)
        except PluginExecutionError:
            outcomes["ran"] += 1
        except CircuitOpenError as exc:
            outcomes["refused"] += 1
            assert exc.plugin_id == "brk-fails" and exc.retry_after_ms > 0
    elapsed = time.monotonic() - started
    # 4 failures open it; a few more were already running on the 2 processes.
    assert 4 <= outcomes["ran"] <= 8, outcomes
    assert outcomes["refused"] == 40 - outcomes["ran"]
    assert elapsed < 40 * 0.2 / 2  # the backlog did not run at 0.2 s a job
    status = client.breaker("brk-fails")
    assert status.state == "open" and status.window_failed >= 4

    other = producer_script(client, (
        "try:\n"
        "    client.submit('brk-fails', 1)\n"
        "    print('enqueued')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc.retry_after_ms > 0)\n"), tmp_path)
    out, err = other.communicate(timeout=60)
    assert out.strip() == "CircuitOpenError True", err
    assert client.redis.llen("plugins.brk-fails") == 0


def test_value_and_plugin_fallbacks(env: tuple[PluginClient, ManagedProcess]) -> None:
    """A submit is refused at once (here: its fallback applies) once this producer has heard
    the breaker open; until then the worker's gate refuses it (the documented bound: the
    transition and the failed job's result are published together, but a producer hears
    them on two connections)."""
    client, _ = env
    view = client._breaker_view
    for plugin in ("brk-value-fallback", "brk-plugin-fallback"):
        heard = view._epoch.get(plugin, 0)
        for _ in range(2):
            with pytest.raises(PluginExecutionError):
                client.submit(plugin, "x").result(timeout=20)
        assert wait_until(lambda p=plugin, n=heard: view._epoch.get(p, 0) > n, timeout_s=10)
    value_job = client.submit("brk-value-fallback", "x")
    assert isinstance(value_job, FallbackJob) and value_job.is_fallback
    assert value_job.result() == {"cached": True}
    assert value_job.meta["fallback_for"] == "brk-value-fallback"
    plugin_job = client.submit("brk-plugin-fallback", {"q": 1})
    assert isinstance(plugin_job, Job) and plugin_job.is_fallback
    assert plugin_job.plugin_id == "brk-echo"
    assert plugin_job.result(timeout=20)["payload"] == {"q": 1}
    assert plugin_job.meta["fallback_for"] == "brk-plugin-fallback"
    real = client.submit("brk-echo", 1)
    assert not real.is_fallback


def test_a_plugin_fallback_runs_the_same_operation_or_none(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    """Before, the fallback plugin always ran `run` (another question's answer), and one not
    offering `run` turned the refusal into UnknownOperationError."""
    client, _ = env
    try:
        client.override_breaker("brk-ops", "force_open")
        job = client.submit("brk-ops", {}, operation="other")
        assert isinstance(job, Job) and job.is_fallback and job.plugin_id == "brk-ops-twin"
        assert job.result(timeout=20) == "other"
        client.override_breaker("brk-ops-narrow", "force_open")
        with pytest.raises(CircuitOpenError):
            client.submit("brk-ops-narrow", {}, operation="other")
        job = client.submit("brk-ops-narrow", {"q": 2})
        assert job.is_fallback and job.result(timeout=20)["payload"] == {"q": 2}
    finally:
        for plugin in ("brk-ops", "brk-ops-narrow"):
            client.override_breaker(plugin, "reset")


def test_recovery_closes_and_a_failing_trial_reopens_longer(
        env: tuple[PluginClient, ManagedProcess], tmp_path: Path) -> None:
    client, _ = env
    flag = tmp_path / "broken"
    flag.write_text("1")
    payload = {"flag": str(flag)}
    for _ in range(3):
        with pytest.raises(PluginExecutionError):
            client.submit("brk-toggle", payload).result(timeout=20)
    assert client.breaker("brk-toggle").state == "open"
    time.sleep(0.6)
    trial = client.submit("brk-toggle", payload)  # still broken: the trial fails
    with pytest.raises(PluginExecutionError):
        trial.result(timeout=20)
    status = client.breaker("brk-toggle")
    assert status.state == "open" and status.open_ms == 1000
    flag.unlink()
    time.sleep(1.1)
    trials = [client.submit("brk-toggle", payload) for _ in range(2)]
    with pytest.raises(CircuitOpenError):
        client.submit("brk-toggle", payload)  # exactly half_open_calls trials admitted
    assert [job.result(timeout=20) for job in trials] == ["recovered", "recovered"]
    status = client.breaker("brk-toggle")
    assert status.state == "closed" and status.history[0]["reason"] == "trial runs succeeded"
    assert client.submit("brk-toggle", payload).result(timeout=20) == "recovered"


def test_on_error_in_another_process_receives_every_error(
        env: tuple[PluginClient, ManagedProcess], tmp_path: Path) -> None:
    client, _ = env
    listener = producer_script(client, (
        "seen = []\n"
        "client.on_error('brk-noisy', seen.append)\n"
        "changes = []\n"
        "client.on_breaker_change('*', changes.append)\n"
        "print('ready', flush=True)\n"
        "deadline = time.time() + 60\n"
        "while len(seen) < 100 and time.time() < deadline:\n"
        "    time.sleep(0.05)\n"
        "time.sleep(0.5)\n"
        "client.close()\n"
        "print(json.dumps([e['job_id'] for e in seen]))\n"), tmp_path)
    assert listener.stdout is not None
    assert listener.stdout.readline().strip() == "ready"
    jobs = [client.submit("brk-noisy", i) for i in range(100)]
    for job in jobs:
        with pytest.raises(PluginExecutionError):
            job.result(timeout=30)
    out, err = listener.communicate(timeout=90)
    received = json.loads(out.strip().splitlines()[-1])
    assert sorted(received) == sorted(job.id for job in jobs), err


def test_on_breaker_change_in_this_process(env: tuple[PluginClient, ManagedProcess]) -> None:
    client, _ = env
    changes: list[dict[str, object]] = []
    client.on_breaker_change("brk-echo", changes.append)
    client.override_breaker("brk-echo", "force_open")
    client.override_breaker("brk-echo", "reset")
    assert wait_until(lambda: len(changes) >= 2, timeout_s=5)
    assert [c["to"] for c in changes[:2]] == ["open", "closed"]


def test_cli_shows_and_overrides_the_breaker(env: tuple[PluginClient, ManagedProcess]) -> None:
    client, _ = env

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pluginpool.pool.tools.cli", "breaker", *args],
                              env=worker_env(client.settings), capture_output=True, text=True,
                              timeout=30, check=False)

    forced = json.loads(cli("brk-echo", "--force-open", "--json").stdout)
    assert forced["state"] == "open" and forced["forced"] and forced["retry_after_ms"] == -1
    with pytest.raises(CircuitOpenError):
        client.submit("brk-echo", 1)
    shown = cli("brk-echo")
    assert "forced open by operator" in shown.stdout
    reset = json.loads(cli("brk-echo", "--reset", "--json").stdout)
    assert reset["state"] == "closed" and reset["history"][0]["reason"] == "reset by operator"
    assert client.submit("brk-echo", 2).result(timeout=20)["payload"] == 2


def test_unreachable_breaker_refuses_dispatch_by_default(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, _ = env
    client.spec("brk-echo")  # cached: only the breaker's Redis is gone below
    dead = unreachable_redis()
    saved = client.breakers
    client.breakers = CircuitBreaker(dead, client.settings.keys, fail_mode="closed")
    try:
        with pytest.raises(BreakerUnavailableError):
            client.submit("brk-echo", 1)
        client.breakers = CircuitBreaker(dead, client.settings.keys, fail_mode="open")
        assert client.submit("brk-echo", 3).result(timeout=20)["payload"] == 3
    finally:
        client.breakers = saved
