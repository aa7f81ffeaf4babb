"""Fault tolerance with real processes on loopback, each bounded in time: workers killed,
Redis restarted, a rolling restart, a breaker draining a backlog, Redis through Sentinel."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from pluginpool.policy.errors import CircuitOpenError, PluginExecutionError
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.pool.tools.redis_bootstrap import free_port, ping
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.jobs import Job
from pluginpool.tasks.spec import PluginSpec
from tests.conftest import CHAOS_SCALE, make_settings, spawn_worker


def counter(plugin_id: str) -> PluginSpec:
    """A plugin of the test's own (its own queue: nothing left by another test reaches it)."""
    return COUNTER.model_copy(update={"id": plugin_id})


COUNTER = PluginSpec.model_validate({
    "id": "counter", "name": "Counts executions", "entrypoint":
    "pp_testplugins.basic:count_and_sleep", "isolation": {"sandboxed": False,
                                                         "max_restarts": 5,
                                                         "restart_cooldown_ms": 50},
    "resource_limits": {"timeout_ms": 5000},
    "breaker": {"minimum_calls": 100_000, "open_at_once_types": []}})


class LocalRedis:
    """A redis-server of the test's own, on a free loopback port, stopped by PID."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.port = free_port()
        self.directory = directory
        self.extra = extra
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = self._start()

    def _start(self) -> ManagedProcess:
        proc = ManagedProcess(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                               "--dir", str(self.directory), "--save", "", *self.extra],
                              log_path=self.directory / "redis.log")
        assert wait_until(lambda: ping(self.url), timeout_s=20), proc.log_text()
        return proc

    def restart(self) -> None:
        self.proc.signal(signal.SIGKILL)
        self.proc.stop()
        self.proc = self._start()

    def stop(self) -> None:
        self.proc.stop()


def outcomes(jobs: list[Job], *, timeout_s: float) -> dict[str, Any]:
    """Wait for every job by polling its state (survives broker restarts)."""
    pending = {job.id: job for job in jobs}
    results: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for job_id, job in list(pending.items()):
            try:
                if not job.ready():
                    continue
                try:
                    results[job_id] = ("ok", job.result(timeout=5))
                except (PluginExecutionError, CircuitOpenError) as exc:
                    results[job_id] = ("error", exc)
                del pending[job_id]
            except (redis.RedisError, OSError, ConnectionError):
                time.sleep(0.2)
        time.sleep(0.1)
    states: dict[str, int] = {}
    for job in pending.values():
        states[job.state] = states.get(job.state, 0) + 1
    assert not pending, f"{len(pending)} jobs never got an outcome: {states}"
    return results


def kill_pool_children(worker: ManagedProcess, *, times: int) -> None:
    """Kill the worker's pool children, `times` times half a second apart."""
    for _ in range(times):
        for child in psutil.Process(worker.pid).children():
            child.kill()
        time.sleep(0.5)


def duplicate_runs(client: PluginClient, key: str, results: dict[str, Any],
                   jobs_n: int) -> int:
    """Check every job ran and ended `ok`; the number of extra runs (at-least-once)."""
    executions = {k: int(v) for k, v in client.redis.hgetall(key).items()}
    assert len(results) == jobs_n
    assert all(kind == "ok" for kind, _ in results.values())
    assert set(executions) == set(results)
    return sum(count - 1 for count in executions.values())


@pytest.mark.timeout(300)
def test_workers_killed_mid_stream_lose_no_job(redis_url: str, tmp_path: Path) -> None:
    """3 workers share a queue; one main process is SIGKILLed, another's pool children are
    killed repeatedly. Every job ends with one outcome; duplicates are counted.

    No job may be lost: the transport claims a message and records it as unacknowledged
    in one atomic step (tasks/reliable_fetch.py), with the consumer holding it. With the
    default (one hour) visibility timeout, what the killed worker held comes back once its
    heartbeat is missing (consumer_dead_after_s, 10 s by default), not after the hour."""
    settings = make_settings(redis_url, key_prefix=f"ppchaos:{uuid.uuid4().hex[:8]}:")
    assert settings.visibility_timeout_s == 3600
    with PluginClient(settings) as client:
        client.register(counter("counter-chaos"))
        workers = [spawn_worker(client, tmp_path, plugins="counter-chaos", concurrency=2)
                   for _ in range(3)]
        key = f"{settings.key_prefix}executions"
        try:
            jobs_n = 1000 * CHAOS_SCALE
            jobs = [client.submit("counter-chaos", {"redis_url": redis_url, "key": key, "n": i,
                                              "seconds": 0.01}) for i in range(jobs_n)]
            time.sleep(2)
            workers[0].signal(signal.SIGKILL)  # its jobs return once its heartbeat stops
            kill_pool_children(workers[1], times=5)
            results = outcomes(jobs, timeout_s=100)
        finally:
            for worker in workers:
                worker.stop()
        duplicates = duplicate_runs(client, key, results, jobs_n)
        assert len({value for _, value in results.values()}) == len(results)
        print(f"{jobs_n} jobs, {duplicates} duplicate executions (at-least-once)")
        assert duplicates < 200


@pytest.mark.timeout(300)
def test_workers_killed_mid_stream_lose_no_job_spread_over_many_plugins(
        redis_url: str, tmp_path: Path) -> None:
    """The same faults with jobs spread at random over 150 plugins (the ready index and the
    group's one wake-up list, not one queue): two workers serve them as one group; one is
    SIGKILLed mid-stream, the other's pool children are killed, and a third starts while
    the first's heartbeat runs out. Every job ends with one outcome."""
    settings = make_settings(redis_url, key_prefix=f"ppmanyk:{uuid.uuid4().hex[:8]}:",
                             restore_sweep_s=0.5, consumer_dead_after_s=3,
                             breaker_enabled=False, usage_events=False)
    plugins = [f"counter-mk{i:03d}" for i in range(150)]
    with PluginClient(settings) as client:
        client.register([counter(plugin_id) for plugin_id in plugins])
        workers = [spawn_worker(client, tmp_path, plugins="counter-mk*", concurrency=2)
                   for _ in range(2)]
        key = f"{settings.key_prefix}executions"
        rng = random.Random(11)
        try:
            jobs_n = 600 * CHAOS_SCALE
            jobs = [client.submit(rng.choice(plugins), {"redis_url": redis_url, "key": key,
                                                        "n": i, "seconds": 0.01})
                    for i in range(jobs_n)]
            assert wait_until(lambda: client.redis.hlen(key) >= 20, timeout_s=30)
            workers[0].signal(signal.SIGKILL)  # its jobs return once its heartbeat stops
            workers.append(spawn_worker(client, tmp_path, plugins="counter-mk*",
                                        concurrency=2))
            kill_pool_children(workers[1], times=3)
            results = outcomes(jobs, timeout_s=120)
        finally:
            for worker in workers:
                worker.stop()
        duplicates = duplicate_runs(client, key, results, jobs_n)
        print(f"{jobs_n} jobs over {len(plugins)} plugins, {duplicates} duplicate executions")


@pytest.mark.timeout(300)
def test_a_paused_worker_declared_dead_loses_nothing_and_its_duplicates_are_counted(
        redis_url: str, tmp_path: Path) -> None:
    """A worker paused (SIGSTOP: a partition, a stalled VM) past its heartbeat bound is
    declared dead and its jobs run elsewhere; resumed, it finishes them too and its late
    acknowledgements are counted as duplicates, in Redis and in /metrics. No job is lost
    and the other worker's records are not erased by the late acks."""
    settings = make_settings(redis_url, key_prefix=f"ppstop:{uuid.uuid4().hex[:8]}:",
                             restore_sweep_s=0.5, consumer_dead_after_s=3)
    with PluginClient(settings) as client:
        client.register(counter("counter-stop"))
        paused = spawn_worker(client, tmp_path, plugins="counter-stop", concurrency=2)
        key = f"{settings.key_prefix}executions"
        jobs = [client.submit("counter-stop", {"redis_url": redis_url, "key": key, "n": i,
                                               "seconds": 0.3}) for i in range(40)]
        other = None
        try:
            assert wait_until(lambda: client.redis.hlen(key) >= 4, timeout_s=30)
            os.killpg(paused.pid, signal.SIGSTOP)
            held = client.redis.hlen(f"{settings.key_prefix}delivery:owner")
            other = spawn_worker(client, tmp_path, plugins="counter-stop", concurrency=2)
            time.sleep(6)  # past the bound: the other worker returns what the paused one held
            os.killpg(paused.pid, signal.SIGCONT)
            results = outcomes(jobs, timeout_s=90)
            assert wait_until(lambda: int(client.redis.hget(
                settings.keys.delivery_stats, "late_acks") or 0) >= 1, timeout_s=20)
        finally:
            os.killpg(paused.pid, signal.SIGCONT)
            paused.stop()
            if other is not None:
                other.stop()
        executions = {k: int(v) for k, v in client.redis.hgetall(key).items()}
        duplicates = sum(count - 1 for count in executions.values())
        late = int(client.redis.hget(settings.keys.delivery_stats, "late_acks") or 0)
        rescued = int(client.redis.hget(settings.keys.delivery_stats, "rescued") or 0)
        print(f"paused worker held {held}; rescued {rescued}, {duplicates} duplicate runs, "
              f"{late} late acks counted")
        assert all(kind == "ok" for kind, _ in results.values()) and len(results) == 40
        assert rescued >= 1 and late >= 1
        assert duplicates <= rescued
        left = [entry for entry in client.redis.hvals("unacked") if "counter-stop" in entry]
        assert not left, "nothing of this test's may stay unacknowledged"


@pytest.mark.timeout(300)
def test_redis_restarted_with_aof_mid_stream(redis_url: str, tmp_path: Path) -> None:
    """Workers, aggregator-free producers and results reconnect; no accepted job is lost."""
    local = LocalRedis(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    # The default (one hour) visibility timeout: what the reconnecting worker held under its
    # old connection comes back through the heartbeat rescue, in seconds.
    settings = make_settings(local.url, key_prefix="ppaof:", redis_socket_timeout_s=2)
    try:
        with PluginClient(settings) as client:
            client.register(counter("counter-aof"))
            worker = spawn_worker(client, tmp_path, plugins="counter-aof", concurrency=2)
            key = "ppaof:executions"
            try:
                jobs = [client.submit("counter-aof", {"redis_url": local.url, "key": key,
                                                  "n": i, "seconds": 0.02})
                        for i in range(300)]
                time.sleep(1.0)
                local.restart()
                more = []
                deadline = time.monotonic() + 30
                while len(more) < 50 and time.monotonic() < deadline:
                    try:
                        more.append(client.submit("counter-aof", {"redis_url": local.url,
                                                              "key": key, "n": 1000 + len(more),
                                                              "seconds": 0.0}))
                    except Exception:
                        time.sleep(0.5)
                results = outcomes(jobs + more, timeout_s=120)
                assert worker.alive()
            finally:
                worker.stop()
        failed = {str(v) for kind, v in results.values() if kind != "ok"}
        assert len(results) == 350 and not failed, failed
    finally:
        local.stop()


def warm_shutdown_code(worker: ManagedProcess, *, timeout_s: float) -> int:
    """The exit code of a worker told to stop; if it is still stopping after `timeout_s`,
    its threads' stacks (Celery's SIGUSR1 handler writes them to its log) in the failure."""
    try:
        return worker.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        worker.signal(signal.SIGUSR1)
        time.sleep(2)
        pytest.fail(f"the warm shutdown took over {timeout_s:.0f} s; the worker's log and "
                    f"stacks:\n{worker.log_text()[-12_000:]}")


def test_rolling_restart_loses_no_job(redis_url: str, tmp_path: Path) -> None:
    """SIGTERM: the worker stops consuming, finishes what runs, and returns what it had
    reserved; a replacement picks up the rest."""
    settings = make_settings(redis_url, key_prefix=f"pproll:{uuid.uuid4().hex[:8]}:")
    with PluginClient(settings) as client:
        client.register(counter("counter-roll"))
        key = f"{settings.key_prefix}executions"
        first = spawn_worker(client, tmp_path, plugins="counter-roll", concurrency=2)
        jobs = [client.submit("counter-roll", {"redis_url": redis_url, "key": key, "n": i,
                                          "seconds": 0.05}) for i in range(200)]
        time.sleep(1)
        first.signal(signal.SIGTERM)
        second = spawn_worker(client, tmp_path, plugins="counter-roll", concurrency=2)
        try:
            assert warm_shutdown_code(first, timeout_s=30) == 0  # a warm shutdown, not a kill
            results = outcomes(jobs, timeout_s=90)
        finally:
            second.stop()
        assert len(results) == 200 and all(kind == "ok" for kind, _ in results.values())
        executions = [int(v) for v in client.redis.hgetall(key).values()]
        assert len(executions) == 200 and max(executions) == 1  # nothing ran twice


@pytest.mark.timeout(300)
def test_a_backlog_drains_fast_once_the_breaker_is_open(redis_url: str,
                                                        tmp_path: Path) -> None:
    settings = make_settings(redis_url, key_prefix=f"ppdrain:{uuid.uuid4().hex[:8]}:")
    with PluginClient(settings) as client:
        client.register(counter("counter-drain"))
        key = f"{settings.key_prefix}executions"
        payload = {"redis_url": redis_url, "key": key, "seconds": 0.5}
        queued = 2_000
        jobs = [client.submit("counter-drain", payload) for _ in range(queued)]
        client.override_breaker("counter-drain", "force_open")
        started = time.monotonic()
        worker = spawn_worker(client, tmp_path, plugins="counter-drain", concurrency=2)
        try:
            assert wait_until(lambda: client.redis.llen("plugins.counter-drain") == 0,
                              timeout_s=120)
            drained_s = time.monotonic() - started
            results = outcomes(jobs[-20:], timeout_s=30)
        finally:
            worker.stop()
        assert all(isinstance(value, CircuitOpenError) for _, value in results.values())
        assert client.redis.hlen(key) == 0  # the plugin never ran
        print(f"{queued} queued jobs refused in {drained_s:.1f} s")
        # Running them (0.5 s each, 2 processes) would take 500 s; refusing them is a
        # claim, a gate check and a stored outcome each: far less, on any machine.
        assert drained_s < queued * 0.5 / 2 / 4


def test_redis_through_sentinel(tmp_path: Path) -> None:
    master = LocalRedis(tmp_path)
    sentinel_port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor pp-master 127.0.0.1 {master.port} 1\n")
    sentinel = ManagedProcess(["redis-server", str(conf), "--sentinel"],
                              log_path=tmp_path / "sentinel.log")
    try:
        assert wait_until(lambda: ping(f"redis://127.0.0.1:{sentinel_port}/0"), timeout_s=20)
        url = f"sentinel://127.0.0.1:{sentinel_port}/0"
        settings = make_settings(url, key_prefix="ppsentinel:", redis_sentinel_master="pp-master")
        with PluginClient(settings) as client:
            client.register(counter("counter-sentinel"))
            assert redis.Redis.from_url(master.url).hexists("ppsentinel:registry:specs",
                                                            "counter-sentinel")
            worker = spawn_worker(client, tmp_path, plugins="counter-sentinel", concurrency=1,
                                  extra_env={"PLUGINPOOL_REDIS_SENTINEL_MASTER": "pp-master"})
            try:
                job = client.submit("counter-sentinel",
                                    {"redis_url": master.url, "key": "k", "n": 7})
                assert job.result(timeout=30) == 7
            finally:
                worker.stop()
    finally:
        sentinel.stop()
        master.stop()


def test_sentinel_urls_need_a_master_name() -> None:
    from pluginpool.policy.errors import SettingsError
    from pluginpool.tasks.settings import Settings

    with pytest.raises(SettingsError, match="SENTINEL_MASTER"):
        Settings.from_env(_env_file=None, redis_url="sentinel://127.0.0.1:26379")
    tls = Settings.from_env(_env_file=None, redis_url="rediss://:secret@redis:6380/0",
                            redis_tls_ca_file="/etc/ssl/ca.pem")
    from pluginpool.tasks.app import create_app

    app = create_app(tls)
    assert app.conf.broker_use_ssl["ssl_ca_certs"] == "/etc/ssl/ca.pem"
    assert app.conf.redis_backend_use_ssl["ssl_cert_reqs"] is not None
