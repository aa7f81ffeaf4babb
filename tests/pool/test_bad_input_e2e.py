"""Bad input on a real worker and aggregator: a too-deep payload from a plain Celery
producer is refused by the worker, which lives on; huge error messages stay bounded in
every place they are stored and served; an idle HTTP client does not pin the aggregator;
unloading an instance leaves nothing of it in Redis."""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from pluginpool.policy.errors import (
    MAX_ERROR_MESSAGE_CHARS,
    MAX_TRACEBACK_CHARS,
    PluginExecutionError,
)
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.spec import PluginSpec
from tests.conftest import TEST_PLUGINS, make_settings, retire, spawn_worker
from tests.pool.test_aggregator import Aggregator
from tests.tasks.test_payload_bounds import nested

Env = tuple[PluginClient, ManagedProcess, Path]
ERROR_BOUND = MAX_ERROR_MESSAGE_CHARS + MAX_TRACEBACK_CHARS + 4_096
"""The most one stored error may take: message, traceback and small fields."""


@pytest.fixture(scope="module")
def env(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    settings = make_settings(redis_url, key_prefix=f"ppbad:{uuid.uuid4().hex[:8]}:",
                             default_breaker={"minimum_calls": 10_000,
                                              "open_at_once_types": []},
                             http_idle_timeout_s=1.0)
    client = PluginClient(settings)
    client.register(TEST_PLUGINS / "test_plugins.toml")
    client.register(PluginSpec(id="stores", name="Stores",
                               entrypoint="pp_testplugins.hostile:storage"))
    logs = tmp_path_factory.mktemp("bad-input")
    worker = spawn_worker(client, logs, plugins="echo,raises,stores", concurrency=2)
    yield client, worker, logs
    retire(worker)
    client.close()


def test_a_too_deep_payload_from_a_plain_producer_fails_and_the_worker_lives(env: Env) -> None:
    client, worker, _ = env
    url = client.settings.redis_url
    plain = Celery("foreign", broker=url, backend=url, set_as_current=False)
    plain.conf.update(task_serializer="json", accept_content=["json"],
                      result_accept_content=["json"])
    try:
        # 70 levels: over the payload limit (64), within what the broker's decode boundary
        # lets through, so it is parse_job in the pool child that refuses it.
        bad = plain.send_task("plugin.echo", args=[nested(70, as_dict=True)],
                              queue="plugins.echo")
        with pytest.raises(Exception) as info:
            bad.get(timeout=30)
        assert type(info.value).__name__ == "InvalidJobError"
        assert "deeper than the 64-level limit" in str(info.value)
        assert bad.state == "FAILURE"
    finally:
        plain.close()
    assert worker.alive()  # the same main process: ManagedProcess holds its PID
    assert client.submit("echo", "after").result(timeout=30)["payload"] == "after"
    assert wait_until(lambda: not any(bad.id in str(item)
                                      for item in client.redis.hvals("unacked")),
                      timeout_s=20)


def test_huge_error_messages_are_bounded_where_stored_and_served(env: Env) -> None:
    client, worker, logs = env
    iid = client.load("raises")
    for n in range(10):
        with pytest.raises(PluginExecutionError) as info:
            client.submit("raises", "x" * 900_000,
                          instance_id=iid if n == 0 else None).result(timeout=60)
        assert len(info.value.message) <= MAX_ERROR_MESSAGE_CHARS
        assert "[truncated " in info.value.message
        assert len(json.dumps(info.value.info.model_dump(mode="json"))) < ERROR_BOUND
    keys = client.settings.keys
    stored = client.redis.lrange(keys.recent_errors("raises"), 0, -1)
    assert stored and all(len(item) < ERROR_BOUND for item in stored)
    [instance_error] = client.redis.lrange(keys.instance_errors(iid), 0, -1)
    assert len(instance_error) < ERROR_BOUND
    assert len(client.sandbox_info(iid).recent_errors) == 1

    aggregator = Aggregator(client, logs)
    try:
        with urllib.request.urlopen(aggregator.base + "/health", timeout=30) as response:
            body = response.read()
        plugins: list[dict[str, Any]] = json.loads(body)["plugins"]
        raises = next(item for item in plugins if item["plugin_id"] == "raises")
        assert len(raises["last_errors"]) == 10
        assert len(body) < 100_000  # ten 0.9 MB messages made it 9 MB before
    finally:
        retire(aggregator.proc)
    assert worker.alive()


def test_an_idle_http_connection_is_closed_while_others_are_served(env: Env) -> None:
    client, _, logs = env
    aggregator = Aggregator(client, logs)
    try:
        idle = [socket.create_connection(("127.0.0.1", aggregator.port), timeout=30)
                for _ in range(5)]
        assert aggregator.get("/livez")["ok"] is True  # served while the idle ones wait
        for sock in idle:
            assert sock.recv(1) == b""  # closed by the server after http_idle_timeout_s
            sock.close()
        assert aggregator.get("/livez")["ok"] is True
    finally:
        retire(aggregator.proc)


def test_unload_removes_the_instances_storage_usage_and_errors(env: Env) -> None:
    client = env[0]
    keys = client.settings.keys
    iid = client.load("stores")
    assert client.execute(iid, {"action": "add"}, timeout=30)["count"] == 1
    with pytest.raises(PluginExecutionError):
        client.execute(iid, None, timeout=30)  # the plugin fails on a None payload
    assert client.redis.exists(keys.storage(iid), keys.storage_used(iid),
                               keys.instance_usage(iid), keys.instance_errors(iid)) == 4
    client.unload(iid)
    assert [key for key in client.redis.scan_iter(match=f"{keys.prefix}*") if iid in key] == []
