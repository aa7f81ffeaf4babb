"""Producers: job statuses pushed to callbacks (in order, once each, across processes), the
asyncio client (1,000 jobs awaited on one loop with a bounded thread count), a plain Celery
producer's job reaching an idle worker fast, and `celery -A pluginpool.tasks` commands.

One worker for the module (plugins in the pool child, breaker never opening).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from pluginpool.policy.errors import PluginExecutionError, PluginPoolError
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.tasks import AsyncPluginClient
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.spec import PluginSpec
from tests.conftest import TEST_PLUGINS, make_settings, retire, spawn_worker, worker_env


@pytest.fixture(scope="module")
def env(redis_url: str, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[PluginClient, ManagedProcess]]:
    settings = make_settings(redis_url, key_prefix=f"ppprod:{uuid.uuid4().hex[:8]}:",
                             default_breaker={"minimum_calls": 10_000, "open_at_once_types": []},
                             default_isolation={"sandboxed": False})
    client = PluginClient(settings)
    client.register(TEST_PLUGINS / "test_plugins.toml")
    # A long idle wait: only keyspace notifications can bring a plain producer's job fast.
    worker = spawn_worker(client, tmp_path_factory.mktemp("producers"), concurrency=2,
                          extra_env={"PLUGINPOOL_BROKER_IDLE_WAIT_S": "10"})
    yield client, worker
    retire(worker)
    client.close()


class Recorder:
    """Collects what callbacks receive, from the subscriber thread."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.done = threading.Event()

    def status(self, change: dict[str, Any]) -> None:
        self.items.append(change["status"])
        if change["status"] in ("succeeded", "failed", "cancelled"):
            self.done.set()

    def outcome(self, value: Any) -> None:
        self.items.append(value)
        self.done.set()


def test_status_callbacks_fire_once_per_change_in_order(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, _ = env
    job = client.submit("sleeps", {"seconds": 0.3})
    statuses, results = Recorder(), Recorder()
    job.on_status_change(statuses.status)
    job.on_result(results.outcome)
    assert statuses.done.wait(20) and results.done.wait(20)
    assert statuses.items == ["queued", "started", "succeeded"]
    assert results.items == [job.result(timeout=5)]
    assert job.status() == "succeeded"
    late = Recorder()  # a follower arriving after the end still gets every change, once
    client.job(job.id).on_status_change(late.status)
    assert late.done.wait(10) and late.items == ["queued", "started", "succeeded"]


def test_failures_and_restarts_reach_on_error_and_the_status_history(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, _ = env
    failing = client.submit("raises", "x")
    errors = Recorder()
    failing.on_error(errors.outcome)
    assert errors.done.wait(20)
    assert isinstance(errors.items[0], PluginExecutionError)
    assert errors.items[0].type == "runtime"
    restarted = client.submit("crashes-once", None)
    statuses = Recorder()
    restarted.on_status_change(statuses.status)
    assert statuses.done.wait(30)
    assert statuses.items == ["queued", "started", "retrying", "started", "succeeded"]


def test_another_process_follows_a_job_it_did_not_submit(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, _ = env
    job = client.submit("sleeps", {"seconds": 0.3})
    follower = subprocess.run(
        [sys.executable, "-m", "pluginpool.pool.tools.cli", "--json", "job", job.id, "--follow",
         "--timeout", "30"],
        env=worker_env(client.settings), capture_output=True, text=True, timeout=60)
    assert follower.returncode == 0, follower.stderr
    lines = [json.loads(line) for line in follower.stdout.splitlines()]
    assert [line["status"] for line in lines] == ["queued", "started", "succeeded"]
    assert [line["seq"] for line in lines] == [1, 2, 3]


@pytest.mark.timeout(300)  # behaviour, not speed: a loaded machine runs 1,000 jobs slowly
def test_async_client_awaits_1000_jobs_on_one_loop_with_few_threads(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, _ = env
    seen: list[int] = []

    async def main() -> list[Any]:
        async with AsyncPluginClient(client.settings, max_threads=4) as aclient:
            jobs = await asyncio.gather(*(aclient.submit("echo", i) for i in range(1000)))
            statuses: list[str] = []

            async def on_change(change: dict[str, Any]) -> None:
                statuses.append(change["status"])

            await jobs[0].on_status_change(on_change)
            outcomes: list[Any] = []

            async def on_result(value: Any) -> None:
                outcomes.append(value["payload"])

            async def on_error(error: BaseException) -> None:
                outcomes.append(type(error).__name__)

            await jobs[1].on_result(on_result)
            await (await aclient.submit("raises", "z")).on_error(on_error)
            values = await asyncio.gather(*(job.result(timeout=240) for job in jobs))
            seen.append(threading.active_count())
            with pytest.raises(PluginExecutionError):
                await (await aclient.submit("raises", "y")).result(timeout=30)
            await asyncio.sleep(0.5)
            assert statuses == ["queued", "started", "succeeded"]
            assert sorted(map(str, outcomes)) == ["1", "PluginExecutionError"]
            return values

    before = threading.active_count()
    values = asyncio.run(main())
    assert [value["payload"] for value in values] == list(range(1000))
    assert seen[0] <= before + 4 + 2  # its executor (4) and at most a couple of helpers


def test_a_cancelled_queued_job_is_pushed_as_cancelled(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, _ = env
    busy = [client.submit("sleeps", {"seconds": 0.4}) for _ in range(2)]  # both processes
    queued = client.submit("sleeps", {"seconds": 0.01})
    client.cancel(queued.id, plugin_id="sleeps")
    statuses = Recorder()
    queued.on_status_change(statuses.status)
    assert statuses.done.wait(20)
    assert statuses.items == ["queued", "cancelled"]

    async def awaited() -> str:
        async with AsyncPluginClient(client.settings) as aclient:
            try:
                await aclient.result(queued.id, timeout=20)
            except PluginPoolError as exc:
                return type(exc).__name__
        return "no error"

    assert asyncio.run(awaited()) == "JobCancelledError"
    for job in busy:
        job.result(timeout=20)


def test_a_plain_celery_producers_job_reaches_an_idle_worker_fast(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    """The worker's idle wait is 10 s here: a fast start comes from keyspace notifications."""
    client, _ = env
    url = client.settings.redis_url
    plain = Celery("plain-idle", broker=url, backend=url, set_as_current=False)
    plain.conf.update(task_serializer="json", accept_content=["json"],
                      result_accept_content=["json"])
    try:
        for i in range(3):
            time.sleep(0.5)  # idle: the worker waits on its wake-up list
            started = time.monotonic()
            result = plain.send_task("plugin.echo", args=[i], queue="plugins.echo")
            assert result.get(timeout=10)["value"]["payload"] == i
            assert time.monotonic() - started < 2.0
    finally:
        plain.close()


def registered_limits(client: PluginClient, node: str, task: str) -> str:
    """What the worker's main process holds as a task's default time limits."""
    replies = client.app.control.inspect(destination=[node], timeout=1.0).registered(
        "soft_time_limit", "time_limit") or {}
    return next((entry for entry in replies.get(node, []) if entry.startswith(task + " ")), "")


def test_a_plain_producers_job_gets_the_time_limits_of_the_plugins_current_revision(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    """A plain Celery producer sends no time limits, so the worker's defaults for the task
    apply: they follow the plugin's revisions without a restart (the task's strategy, which
    holds them, is built again), and an unsandboxed plugin's soft limit is its timeout_ms."""
    client, worker = env
    node = worker.nodename  # type: ignore[attr-defined]
    spec = {"id": "limits-live", "name": "limits-live", "isolation": {"sandboxed": False},
            "entrypoint": "pp_testplugins.basic:sleeps"}
    client.register(PluginSpec.model_validate({**spec, "resource_limits": {"timeout_ms": 60_000}}))
    url = client.settings.redis_url
    plain = Celery("plain-limits", broker=url, backend=url, set_as_current=False)
    plain.conf.update(task_serializer="json", accept_content=["json"],
                      result_accept_content=["json"])
    try:
        assert wait_until(lambda: "soft_time_limit=60.0" in registered_limits(
            client, node, "plugin.limits-live"), timeout_s=20)
        # Its strategy is built, with a 60 s soft limit, at its first plain message.
        first = plain.send_task("plugin.limits-live", args=[{"seconds": 0}],
                                queue="plugins.limits-live")
        assert first.get(timeout=20)["value"] == "woke up"
        client.register(PluginSpec.model_validate(
            {**spec, "resource_limits": {"timeout_ms": 1000}}))
        assert wait_until(lambda: "soft_time_limit=1.0" in registered_limits(
            client, node, "plugin.limits-live"), timeout_s=20)
        started = time.monotonic()
        slow = plain.send_task("plugin.limits-live", args=[{"seconds": 8}],
                               queue="plugins.limits-live")
        with pytest.raises(Exception) as failed:
            slow.get(timeout=30)
        assert time.monotonic() - started < 6, "the old revision's 60 s limit applied"
        assert "time" in f"{type(failed.value).__name__} {failed.value}".lower()
    finally:
        plain.close()
        client.unregister("limits-live")


def celery_cli(client: PluginClient, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "celery", "-A", "pluginpool.tasks", *args],
                          env=worker_env(client.settings), capture_output=True, text=True,
                          timeout=60)


def test_celery_a_pluginpool_tasks_commands_from_the_readme(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, worker = env
    node = worker.nodename  # type: ignore[attr-defined]
    status = celery_cli(client, "status")
    assert status.returncode == 0 and node in status.stdout, status.stderr
    queues = celery_cli(client, "inspect", "active_queues", "-d", node, "--json")
    assert queues.returncode == 0 and "plugins.echo" in queues.stdout, queues.stderr
    ping = celery_cli(client, "inspect", "ping", "-d", node)
    assert ping.returncode == 0 and "pong" in ping.stdout
    control = celery_cli(client, "control", "add_consumer", "plugins.sleeps", "-d", node)
    assert control.returncode == 0, control.stderr
    held = f"held-{uuid.uuid4().hex[:6]}"  # a queue no worker consumes
    plain = Celery("plain-purge", broker=client.settings.redis_url, set_as_current=False)
    plain.conf.update(task_serializer="json")
    for i in range(3):
        plain.send_task("plugin.echo", args=[i], queue=held)
    plain.close()
    purge = celery_cli(client, "purge", "-f", "-Q", held)
    assert purge.returncode == 0 and "3 messages" in purge.stdout, purge.stdout + purge.stderr
    assert client.redis.llen(held) == 0


def test_celery_events_dump_shows_pluginpool_task_events(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, _ = env
    dump = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "pluginpool.tasks", "events", "--dump"],
        env={**worker_env(client.settings), "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines: list[str] = []
        def read() -> None:
            for line in dump.stdout:  # type: ignore[union-attr]
                lines.append(line)

        threading.Thread(target=read, daemon=True).start()
        assert wait_until(lambda: any("heartbeat" in line for line in lines), timeout_s=30)
        job = client.submit("echo", "seen")
        job.result(timeout=20)
        assert wait_until(lambda: any(job.id in line and "succeeded" in line
                                      for line in lines), timeout_s=20), lines[-20:]
    finally:
        dump.kill()
        dump.wait(timeout=10)
