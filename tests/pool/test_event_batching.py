"""A worker's task events go out in batches (pool/event_batching.py), and none is lost:
a real prefork worker, real Redis, Celery's own event receiver."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
import redis

from pluginpool.pool.event_batching import FlushWindow
from pluginpool.pool.tools.processes import wait_until
from pluginpool.tasks.client import PluginClient
from tests.conftest import TEST_PLUGINS, make_settings, spawn_worker
from tests.events import CountingReceiver, Events


def test_the_first_event_after_a_quiet_spell_goes_at_once_the_rest_wait_for_the_window() -> None:
    window = FlushWindow(0.05)
    assert window.due(10.0) == 10.0
    window.flushed(10.0)
    assert window.due(10.01) == pytest.approx(10.05)
    assert window.due(10.2) == 10.2
    assert FlushWindow(0.0).due(3.0) == 3.0


@pytest.fixture
def batching_client(redis_url: str) -> Iterator[PluginClient]:
    settings = make_settings(redis_url, key_prefix=f"ppev:{uuid.uuid4().hex[:8]}:",
                             event_batch_ms=5000,
                             default_isolation={"sandboxed": False})
    with PluginClient(settings) as client:
        client.register(TEST_PLUGINS / "test_plugins.toml")
        yield client


def test_events_of_many_jobs_arrive_all_in_fewer_messages_after_a_reconnect_and_at_shutdown(
        batching_client: PluginClient, tmp_path: Path) -> None:
    client = batching_client
    events = Events(client)
    worker = spawn_worker(client, tmp_path, concurrency=2)
    try:
        assert events.listening()
        jobs = [client.submit("echo", {"i": i}) for i in range(30)]
        for job in jobs:
            job.result(timeout=30)
        ids = {job.id for job in jobs}
        # Every job's events arrive: the last batch when its window ends.
        assert wait_until(lambda: events.of("task-succeeded", ids) == ids, timeout_s=10)
        assert events.of("task-received", ids) == ids
        assert events.of("task-started", ids) == ids
        # Batched: the worker's 90 events came in a few messages (Celery alone publishes
        # a batch at each turn of its loop: two or three a job here).
        assert CountingReceiver.batches < len(jobs) / 2, CountingReceiver.batches

        # A job that ends inside a window, then the worker's Redis connections drop: what
        # was held is published once it has reconnected (Celery drops its batch buffer).
        held = client.submit("echo", {"held": 1})
        held.result(timeout=30)
        assert drop_redis_connections(worker.pid, client.settings.redis_url) > 0
        assert wait_until(lambda: events.of("task-succeeded", {held.id}) == {held.id},
                          timeout_s=30)
        assert events.of("task-started", {held.id}) == {held.id}

        # A job that ends inside a window: its events are still buffered when the worker
        # is stopped, and the shutdown publishes them.
        client.submit("echo", {"warm": 1}).result(timeout=30)
        last = client.submit("echo", {"last": 1})
        last.result(timeout=30)
        # The result is stored by the pool process; its task-succeeded event is made by the
        # main process once the pool tells it (milliseconds later): then it is held (the
        # window is 5 s). One that finishes in the shutdown's drain comes after the worker's
        # offline, as in Celery itself.
        time.sleep(1.0)
        worker.stop()  # SIGTERM, warm shutdown, waited for
        assert wait_until(lambda: events.of("task-succeeded", {last.id}) == {last.id},
                          timeout_s=10)
        # ... before the worker says it is offline: after it, every event would make
        # Flower (celery's State) count the worker alive again.
        # (A reconnect above restarted the heartbeat too: the last worker-offline counts.)
        def offline_after_last_job() -> bool:
            kinds = [(e.get("type"), e.get("uuid")) for e in list(events.seen)]
            return ("worker-offline", None) in kinds[kinds.index(("task-succeeded", last.id)):]
        assert wait_until(offline_after_last_job, timeout_s=10)
    finally:
        worker.stop()
        events.close()


def drop_redis_connections(pid: int, redis_url: str) -> int:
    """Kill, on the server, every connection the process has to Redis (as a network
    partition would); returns how many."""
    port = urlsplit(redis_url).port or 6379
    ours = {c.laddr.port for c in psutil.Process(pid).net_connections("tcp")
            if c.raddr and c.raddr.port == port}
    server = redis.Redis.from_url(redis_url)
    killed = 0
    for client in server.client_list():
        if int(client["addr"].rsplit(":", 1)[1]) in ours:
            server.client_kill_filter(_id=client["id"])
            killed += 1
    server.close()
    return killed

