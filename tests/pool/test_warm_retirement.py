"""Warm sandboxes are retired, their teardown run: beyond PLUGINPOOL_WARM_SANDBOXES (least
recently used first) and after PLUGINPOOL_WARM_IDLE_S without a run."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pluginpool.pool.sandbox import owners
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.spec import PluginSpec
from tests.conftest import make_settings, spawn_worker


@pytest.fixture(scope="module")
def env(redis_url: str, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[PluginClient, ManagedProcess]]:
    settings = make_settings(redis_url, key_prefix=f"ppretire:{uuid.uuid4().hex[:8]}:",
                             warm_root=str(tmp_path_factory.mktemp("warm")))
    client = PluginClient(settings)
    client.register([PluginSpec(id="stateful", name="stateful",
                                entrypoint="pp_testplugins.lifecycle:Stateful"),
                     PluginSpec.model_validate({
                         "id": "stateful-in", "name": "stateful in process",
                         "entrypoint": "pp_testplugins.lifecycle:Stateful",
                         "isolation": {"sandboxed": False}})])
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


def test_a_class_set_up_in_the_pool_child_is_torn_down_on_unload_and_when_idle(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    """`sandboxed = false`: before, its close() ran only when 16 newer instances pushed it
    out, inside whichever job did."""
    client, worker = env
    unloaded = client.load("stateful-in", {})
    assert client.execute(unloaded, {"add": 1}, timeout=60)["items"] == [1]
    client.unload(unloaded)
    said = f"'{unloaded}') retired (instance unloaded); teardown ran"
    assert wait_until(lambda: said in worker.log_text(), timeout_s=15)
    idle = client.load("stateful-in", {})
    client.execute(idle, {"add": 1}, timeout=60)
    said = f"'{idle}') retired (idle); teardown ran"
    assert wait_until(lambda: said in worker.log_text(), timeout_s=15)
    client.unload(idle)


def test_a_worker_that_stops_tears_its_sandboxes_down_and_leaves_no_home(
        redis_url: str, tmp_path: Path) -> None:
    """A warm shutdown (SIGTERM to the worker, as `docker stop` sends it): every pool process
    retires its sandboxes, teardown included, and removes their homes; their guardian ends
    with its pool process."""
    warm_root = tmp_path / "warm"
    settings = make_settings(redis_url, key_prefix=f"ppstop:{uuid.uuid4().hex[:8]}:",
                             warm_root=str(warm_root))
    with PluginClient(settings) as client:
        # Not "stateful": the module's worker consumes plugins.stateful (queue names are
        # not prefixed) and would take this test's jobs, with instances it cannot see.
        client.register(PluginSpec(id="stateful-stop", name="stateful",
                                   entrypoint="pp_testplugins.lifecycle:Stateful"))
        worker = spawn_worker(client, tmp_path, concurrency=1)
        try:
            zygote = client.execute(client.load("stateful-stop", {}), {"add": 1},
                                    timeout=60)["zygote"]
            homes = [path for path in warm_root.iterdir() if path.name != owners.OWNERS_DIR]
            assert len(homes) == 1
            assert len(list((warm_root / owners.OWNERS_DIR).iterdir())) == 1  # its record
            guardian = psutil.Process(zygote).ppid()
            assert guardian not in (1, worker.pid)
            os.kill(worker.pid, signal.SIGTERM)
            worker.process.wait(timeout=30)
        finally:
            worker.stop()
        assert f"(pid {zygote}) retired (shutdown); teardown ran" in worker.log_text()
        assert wait_until(lambda: not psutil.pid_exists(zygote), timeout_s=10)
        assert wait_until(lambda: ended(guardian), timeout_s=10), "its guardian lingers"
        assert [p.name for p in warm_root.iterdir()] == [owners.OWNERS_DIR]
        assert list((warm_root / owners.OWNERS_DIR).iterdir()) == [], "its record dropped"


def test_the_sweep_removes_only_homes_left_empty_long_ago(tmp_path: Path) -> None:
    from pluginpool.pool.sandbox.housekeeping import STALE_HOME_S, sweep_stale_homes

    old = time.time() - STALE_HOME_S - 10
    stale, live, fresh = tmp_path / "stale", tmp_path / "live", tmp_path / "fresh"
    for home in (stale, live, fresh):
        home.mkdir()
    (live / "setup").mkdir()
    for home in (stale, live):
        os.utime(home, (old, old))
    sweep_stale_homes(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "live"]


def ended(pid: int) -> bool:
    """No such process, or only its exit status left (re-parented to a PID 1 that may not
    reap: not this test's to judge)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
