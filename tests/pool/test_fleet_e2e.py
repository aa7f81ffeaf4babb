"""A live fleet on real Redis and real prefork workers: plugins registered, changed, rolled
back and unregistered while the workers run, with code that exists only as artifacts.

One worker for the module, started with `--plugins all` before any plugin is registered,
in an empty directory, with no plugin path: every plugin's code reaches it through Redis.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pluginpool.policy.errors import ErrorType, PluginExecutionError, PluginUnregisteredError
from pluginpool.pool.fleet import PluginSelector
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.pool.worker import select_specs
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec
from tests.conftest import retire, worker_env
from tests.fleet_packages import manifest, variant, wheel_of, write_package

QUIET_BREAKER = {"minimum_calls": 10_000, "open_at_once_types": []}
"""These tests fail runs on purpose; the breaker has tests of its own."""


@dataclass
class Fleet:
    client: PluginClient
    worker: ManagedProcess
    node: str
    root: Path
    wheels: dict[int, Path]
    cwd: Path


def start_worker(client: PluginClient, root: Path, *, plugins: str) -> tuple[ManagedProcess, str]:
    """`pluginpool worker` in an empty directory; returns once it answers a ping."""
    node = f"fleet-{uuid.uuid4().hex[:6]}@localhost"
    cwd = root / f"cwd-{node.split('@')[0]}"
    cwd.mkdir()
    proc = ManagedProcess(
        [sys.executable, "-m", "pluginpool.pool.tools.cli", "worker", "--plugins", plugins,
         "--concurrency", "2", "--name", node, "--loglevel", "INFO"],
        env=worker_env(client.settings), log_path=root / f"{node}.log", cwd=str(cwd))
    ready = wait_until(lambda: not proc.alive() or bool(
        client.app.control.ping(destination=[node], timeout=0.5)), timeout_s=60)
    if not ready or not proc.alive():
        proc.stop()
        pytest.fail(f"worker {node} did not start:\n{proc.log_text()[-4000:]}")
    return proc, node


def consumed_queues(client: PluginClient, node: str) -> set[str]:
    replies = client.app.control.inspect(destination=[node], timeout=1.0).active_queues() or {}
    return {queue["name"] for queue in replies.get(node, [])}


@pytest.fixture(scope="module")
def fleet(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    settings = Settings(_env_file=None, redis_url=redis_url,  # type: ignore[call-arg]
                        key_prefix=f"ppfleet:{uuid.uuid4().hex[:8]}:", plugin_paths=[],
                        artifact_cache_dir=str(root / "cache"), fleet_reconcile_s=2.0,
                        default_breaker=QUIET_BREAKER)
    client = PluginClient(settings)
    wheels = {version: wheel_of(root / "wheels", version=version) for version in (1, 2)}
    worker, node = start_worker(client, root, plugins="all")
    yield Fleet(client, worker, node, root, wheels, root)
    retire(worker)
    client.close()


def test_worker_started_with_no_plugins_serves_one_registered_later(fleet: Fleet) -> None:
    """Registered from a package directory (built into a wheel at register) after the
    worker started: served without a restart, from the artifact alone."""
    client = fleet.client
    assert str(fleet.root) not in worker_env(client.settings).get("PLUGINPOOL_PLUGIN_PATHS", "")
    source = write_package(fleet.root / "live-src", version=1)
    started = time.monotonic()
    [spec] = client.register(manifest(source.parent / "plugins.toml", {"acme-live": {
        "name": "Live", "version": "1.0.0", "entrypoint": "fleetpkg:run",
        "source": source.name}}))
    assert spec.artifact is not None and spec.source == str(source)
    job = client.submit("acme-live", {"text": "a b c"})
    assert job.result(timeout=30) == {"version": 1, "words": 3}
    served_s = time.monotonic() - started
    assert served_s < 20, f"register to first result took {served_s:.1f} s"
    assert job.meta["revision"] == 1
    assert job.meta["usage"]["sandboxed"] is True
    assert "plugins.acme-live" in consumed_queues(client, fleet.node)


def test_new_revision_mid_stream_fails_no_job_and_rollback_restores(fleet: Fleet) -> None:
    """300 jobs streaming; revision 2 (other code) registered after the first 150: every
    job succeeds, each ran the code of the revision its meta names, the last ones ran
    revision 2; `rollback` brings version 1 back as revision 3. Run in the pool child
    (sandboxed = false): the long-lived process must not keep revision 1's module."""
    client = fleet.client

    def register(version: int) -> int:
        [spec] = client.register(manifest(fleet.root / f"load-v{version}.toml", {"acme-load": {
            "name": "Load", "version": f"{version}.0.0", "entrypoint": "fleetpkg:run",
            "source": str(fleet.wheels[version]), "isolation": {"sandboxed": False}}}))
        return spec.revision

    assert register(1) == 1
    jobs = []
    for n in range(300):
        if n == 150:
            assert register(2) == 2
        jobs.append(client.submit("acme-load", {"text": "x " * (n % 5)}))
    results = [(job.result(timeout=60), job.meta["revision"]) for job in jobs]
    assert all(value["version"] == revision for value, revision in results)
    assert {revision for _, revision in results[150:]} == {2}
    assert results[0][1] == 1

    spec = client.rollback("acme-load")
    assert (spec.revision, spec.version) == (3, "1.0.0")
    job = client.submit("acme-load", {"text": "a"})
    assert job.result(timeout=30)["version"] == 1
    assert job.meta["revision"] == 3
    records = client.revisions("acme-load")
    assert [(r.revision, r.action, r.restored_revision) for r in records] == [
        (1, "register", None), (2, "register", None), (3, "rollback", 1)]
    assert records[0].source_sha256 == records[2].source_sha256 != records[1].source_sha256


@pytest.mark.parametrize("sandboxed", [True, False])
def test_a_plugin_registered_again_after_unregister_runs_its_new_code(
        fleet: Fleet, sandboxed: bool) -> None:
    """Before, its revisions started again at 1: workers had revision 1 set up (a warm
    sandbox, an in-process instance) and served the old code as the new revision 1."""
    client = fleet.client
    plugin = f"acme-again-{'s' if sandboxed else 'u'}"
    fields = {"name": "Again", "entrypoint": "fleetpkg:run",
              "isolation": {"sandboxed": sandboxed}}
    client.register(manifest(fleet.root / f"{plugin}-1.toml", {plugin: {
        **fields, "source": str(fleet.wheels[1])}}))
    assert client.submit(plugin, {"text": "a"}).result(timeout=60)["version"] == 1
    client.unregister(plugin)
    [spec] = client.register(manifest(fleet.root / f"{plugin}-2.toml", {plugin: {
        **fields, "source": str(fleet.wheels[2])}}))
    assert spec.revision == 2
    job = client.submit(plugin, {"text": "a"})
    assert job.result(timeout=60)["version"] == 2 and job.meta["revision"] == 2


def test_unregistered_plugin_is_refused_and_its_queue_no_longer_consumed(fleet: Fleet) -> None:
    """Jobs running finish; queued ones fail with a typed `dependency` error (none is left
    without an outcome); submit raises; a message that still reaches the queue (a producer
    bypassing the registry) is failed by the workers' reconciliation."""
    client = fleet.client
    client.register(manifest(fleet.root / "gone.toml", {"acme-gone": {
        "name": "Gone", "entrypoint": "fleetpkg:nap", "source": str(fleet.wheels[1]),
        "isolation": {"sandboxed": False}}}))
    client.submit("acme-gone", {"seconds": 0}).result(timeout=30)
    jobs = [client.submit("acme-gone", {"seconds": 1.0}) for _ in range(6)]
    time.sleep(0.3)
    client.unregister("acme-gone")
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(job.result(timeout=30)["version"])
        except PluginExecutionError as exc:
            assert exc.type is ErrorType.DEPENDENCY, exc
            outcomes.append(exc.details.get("unregistered", "spec gone"))
    assert len(outcomes) == 6
    assert 1 in outcomes and True in outcomes, outcomes
    with pytest.raises(PluginUnregisteredError):
        client.submit("acme-gone", {})
    assert wait_until(lambda: "plugins.acme-gone" not in consumed_queues(client, fleet.node),
                      timeout_s=10)
    late = client.app.send_task("plugin.acme-gone", kwargs={"payload": {}},
                                queue="plugins.acme-gone")
    with pytest.raises(PluginExecutionError) as info:
        client.job(late.id, plugin_id="acme-gone").result(timeout=20)
    assert info.value.type is ErrorType.DEPENDENCY
    assert info.value.details["unregistered"] is True


@pytest.mark.parametrize("fault", ["hash_mismatch", "missing"])
def test_bad_artifact_is_a_dependency_error_and_the_worker_lives(fleet: Fleet,
                                                                 fault: str) -> None:
    client = fleet.client
    plugin_id = f"acme-{fault.replace('_', '-')}"
    wheel = variant(fleet.wheels[1], fleet.root / fault / "fleetpkg-1.0-py3-none-any.whl",
                    tag=fault)
    [spec] = client.register(manifest(fleet.root / f"{fault}.toml", {plugin_id: {
        "name": fault, "entrypoint": "fleetpkg:run", "source": str(wheel)}}))
    assert spec.artifact is not None
    key = client.settings.keys.artifact(spec.artifact.sha256)
    if fault == "missing":
        client.redis.delete(key)
    else:
        client.redis.set(key, "not the wheel that was registered")
    with pytest.raises(PluginExecutionError) as info:
        client.submit(plugin_id, {"text": "x"}).result(timeout=30)
    assert info.value.type is ErrorType.DEPENDENCY
    assert info.value.details["artifact_error"] == fault
    assert info.value.details["artifact_sha256"] == spec.artifact.sha256
    assert fleet.worker.alive()
    assert client.submit("acme-live", {"text": "still here"}).result(timeout=30)["words"] == 2


def test_glob_worker_follows_only_its_plugins_and_catches_up_without_events(
        fleet: Fleet) -> None:
    """`--plugins 'glob-*'`: serves glob-a, not other-b; a spec written to the registry
    without its change event (as if the event was missed) is picked up by reconciliation."""
    client = fleet.client
    worker, node = start_worker(client, fleet.root, plugins="glob-*")
    try:
        published = client.register(manifest(fleet.root / "glob.toml", {
            "glob-a": {"name": "A", "entrypoint": "fleetpkg:run",
                       "source": str(fleet.wheels[2])},
            "other-b": {"name": "B", "entrypoint": "fleetpkg:run",
                        "source": str(fleet.wheels[2])}}))
        assert wait_until(lambda: "plugins.glob-a" in consumed_queues(client, node),
                          timeout_s=15)
        assert "plugins.other-b" not in consumed_queues(client, node)
        silent = published[0].model_copy(update={"id": "glob-c", "revision": 1})
        # A change whose event was lost: the spec and the registry's change counter move
        # together (as in Registry.publish), no event is published.
        with client.redis.pipeline() as pipe:
            pipe.hset(client.settings.keys.specs, "glob-c", silent.model_dump_json())
            pipe.incr(client.settings.keys.registry_version)
            pipe.execute()
        assert wait_until(lambda: "plugins.glob-c" in consumed_queues(client, node),
                          timeout_s=15)
    finally:
        retire(worker)


def test_selectors_all_ids_and_globs(client: PluginClient) -> None:
    """Which registered plugins a worker's `--plugins` selects (run without a worker)."""
    assert select_specs(client.registry, "all") == []  # a worker may start with none
    client.register([PluginSpec(id=pid, name=pid, entrypoint="pkg.mod:run")
                     for pid in ("acme-a", "acme-b", "other")])
    assert [s.id for s in select_specs(client.registry, "acme-*")] == ["acme-a", "acme-b"]
    assert [s.id for s in select_specs(client.registry, "other,acme-b")] == ["acme-b", "other"]
    assert PluginSelector.parse("all").matches("anything")
    assert not PluginSelector.parse("acme-*").matches("other")
