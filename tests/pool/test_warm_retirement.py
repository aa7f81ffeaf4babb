"""Warm sandboxes are retired, their teardown run: beyond PLUGINPOOL_WARM_SANDBOXES (least
recently used first) and after PLUGINPOOL_WARM_IDLE_S without a run."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psutil
import pytest

from pluginpool.pool.processes import ManagedProcess, wait_until
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.spec import PluginSpec
from tests.conftest import make_settings, spawn_worker


@pytest.fixture(scope="module")
def env(redis_url: str, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[PluginClient, ManagedProcess]]:
    settings = make_settings(redis_url, key_prefix=f"ppretire:{uuid.uuid4().hex[:8]}:",
                             warm_root=str(tmp_path_factory.mktemp("warm")))
    client = PluginClient(settings)
    client.register(PluginSpec(id="stateful", name="stateful",
                               entrypoint="pp_testplugins.lifecycle:Stateful"))
    worker = spawn_worker(client, tmp_path_factory.mktemp("retire-worker"), concurrency=1,
                          extra_env={"PLUGINPOOL_WARM_SANDBOXES": "1",
                                     "PLUGINPOOL_WARM_IDLE_S": "2"})
    yield client, worker
    worker.stop()
    client.close()


def test_least_recently_used_then_idle_sandboxes_are_retired_with_their_teardown(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, worker = env
    first = client.execute(client.load("stateful", {}), {"add": 1}, timeout=60)["zygote"]
    second = client.execute(client.load("stateful", {}), {"add": 1}, timeout=60)["zygote"]
    assert first != second
    evicted = f"(pid {first}) retired (least recently used); teardown ran"
    assert wait_until(lambda: evicted in worker.log_text(), timeout_s=15)
    assert wait_until(lambda: not psutil.pid_exists(first), timeout_s=10)
    idle = f"(pid {second}) retired (idle); teardown ran"
    assert wait_until(lambda: idle in worker.log_text(), timeout_s=15)
    assert wait_until(lambda: not psutil.pid_exists(second), timeout_s=10)
