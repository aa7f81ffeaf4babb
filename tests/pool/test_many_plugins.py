"""Many plugins: a worker's cost follows its work, not its plugin count, and it stays fair.

A worker consuming hundreds of plugin queues finds every job through the ready index
(jobs from pluginpool's client, which index their queue as they push, and jobs from a
plain Celery producer, found through keyspace notifications), and serves ready queues
round robin, so one plugin's deep backlog does not starve the others.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery

from pluginpool.policy.redis_text import as_text
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.spec import PluginSpec
from tests.conftest import make_settings, retire, spawn_worker

PLUGINS = 300


def echo(plugin_id: str, function: str = "echo") -> PluginSpec:
    return PluginSpec.model_validate({
        "id": plugin_id, "name": plugin_id, "entrypoint": f"pp_testplugins.basic:{function}",
        "isolation": {"sandboxed": False}, "resource_limits": {"timeout_ms": 5000}})


@pytest.fixture(scope="module")
def fleet(redis_url: str, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[PluginClient, ManagedProcess]]:
    settings = make_settings(redis_url, key_prefix=f"ppmany:{uuid.uuid4().hex[:8]}:",
                             breaker_enabled=False, usage_events=False)
    client = PluginClient(settings)
    # The backlog's jobs take 10 ms: on a fast host the worker ran most of a backlog of
    # no-ops while it was still being submitted, leaving nothing to starve the others.
    client.register([echo(f"many-{i:03d}") for i in range(PLUGINS)]
                    + [echo("many-deep", "slow_echo")])
    worker = spawn_worker(client, tmp_path_factory.mktemp("many"), plugins="many-*",
                          concurrency=2)
    yield client, worker
    retire(worker)
    client.close()


def test_every_job_is_found_among_hundreds_of_queues(
        fleet: tuple[PluginClient, ManagedProcess]) -> None:
    """Jobs spread at random over 300 plugins, from the client and from plain Celery."""
    client, worker = fleet
    rng = random.Random(3)
    ours = [client.submit(f"many-{rng.randrange(PLUGINS):03d}", i) for i in range(200)]
    plain = Celery("plain-many", broker=client.settings.redis_url,
                   backend=client.settings.redis_url, set_as_current=False)
    plain.conf.update(task_serializer="json", accept_content=["json"],
                      result_accept_content=["json"])
    theirs = []
    for i in range(40):
        plugin = f"many-{rng.randrange(PLUGINS):03d}"
        theirs.append(plain.send_task(f"plugin.{plugin}", args=[i], queue=f"plugins.{plugin}"))
    assert [job.result(timeout=60)["payload"] for job in ours] == list(range(200))
    assert [r.get(timeout=60)["value"]["payload"] for r in theirs] == list(range(40))
    assert worker.alive()
    plain.close()


def test_a_deep_backlog_does_not_starve_the_other_plugins(
        fleet: tuple[PluginClient, ManagedProcess]) -> None:
    """One plugin with 1,500 queued jobs, then 20 others with 5 each: the ready queues are
    served in turn, so the others all finish while the backlog still waits."""
    client, _ = fleet
    backlog = [client.submit("many-deep", i) for i in range(1500)]
    others = [client.submit(f"many-{p:03d}", p) for p in range(20) for _ in range(5)]
    waiting = client.redis.llen("plugins.many-deep")  # what the worker had not run yet
    for job in others:
        job.result(timeout=60)
    left = client.redis.llen("plugins.many-deep")
    print(f"others done with {left} of the {waiting} backlog jobs then waiting still queued")
    # First in, first out would run all `waiting` first (left == 0). Round robin gives the
    # backlog at most one turn per other job while the others wait (about 100 of its jobs).
    # Relative, not absolute: how much of the backlog ran alone while the others were
    # being submitted depends on how fast the worker is.
    assert waiting > 3 * len(others), "the worker kept up with the submits: nothing to show"
    assert left > 0 and waiting - left <= 3 * len(others), (
        "the other plugins waited for the backlog")
    assert backlog[-1].result(timeout=120)["payload"] == 1499


def test_a_push_whose_notification_was_lost_is_found_by_the_rolling_rescan(
        redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The safety net: a message that reaches a queue without a list-push notification (here
    moved in with RENAME, which raises none; in production a notification lost) is found by
    the rolling rescan within its pass (`PLUGINPOOL_BROKER_RESCAN_S`, 1 s here)."""
    settings = make_settings(redis_url, key_prefix=f"pprescan:{uuid.uuid4().hex[:8]}:",
                             breaker_enabled=False, usage_events=False, broker_rescan_s=1.0)
    client = PluginClient(settings)
    client.register([echo(f"rescan-{i}") for i in range(3)])
    worker = spawn_worker(client, tmp_path_factory.mktemp("rescan"), plugins="rescan-*",
                          concurrency=1)
    plain = Celery("plain-rescan", broker=settings.redis_url, backend=settings.redis_url,
                   set_as_current=False)
    plain.conf.update(task_serializer="json", accept_content=["json"],
                      result_accept_content=["json"])
    try:
        assert client.submit("rescan-0", "warm").result(timeout=30)["payload"] == "warm"
        staging = f"staging-{uuid.uuid4().hex[:6]}"
        sent = plain.send_task("plugin.rescan-2", args=["unnotified"], queue=staging)
        client.redis.rename(staging, "plugins.rescan-2")
        assert sent.get(timeout=30)["value"]["payload"] == "unnotified"
        assert worker.alive()
    finally:
        retire(worker)
        plain.close()
        client.close()


def consumed_lists(client: PluginClient) -> set[str]:
    """The queue lists the module's worker consumes (its consumed-lists sets)."""
    keys = client.settings.keys
    lists: set[str] = set()
    for key in client.redis.scan_iter(match=keys.consumes_prefix + "*", count=1000):
        lists.update(as_text(member) for member in client.redis.smembers(key))
    return lists


def test_plugins_disabled_with_jobs_waiting_do_not_hide_the_others(
        fleet: tuple[PluginClient, ManagedProcess]) -> None:
    """70 plugins disabled while a job of each waits, indexed as ready for the worker group
    (more than a claim reads at a time, all ahead of the next job): the worker no longer
    serves them, and still finds and runs the job of a plugin it serves; enabled again,
    theirs run too."""
    client, worker = fleet
    client.register(PluginSpec.model_validate({
        "id": "many-slow", "name": "many-slow", "entrypoint": "pp_testplugins.basic:sleeps",
        "isolation": {"sandboxed": False}, "resource_limits": {"timeout_ms": 30_000}}))
    assert wait_until(lambda: "plugins.many-slow" in consumed_lists(client), timeout_s=20)
    # Both pool processes busy: the jobs below wait on their queues, indexed as ready.
    slow = [client.submit("many-slow", {"seconds": 8}) for _ in range(2)]
    assert wait_until(lambda: all(job.status() == "started" for job in slow), timeout_s=20)
    disabled = [f"many-{p:03d}" for p in range(200, 270)]
    waiting = [client.submit(plugin_id, plugin_id) for plugin_id in disabled]
    for plugin_id in disabled:
        client.disable(plugin_id)
    assert wait_until(lambda: not {f"plugins.{p}" for p in disabled} & consumed_lists(client),
                      timeout_s=20)
    assert all(client.redis.llen(f"plugins.{p}") == 1 for p in disabled), \
        "the disabled plugins' jobs must still wait when the worker is free again"
    # They left the group's ready index: no claim reads past them while they wait.
    indexed = {raw.decode() for key in client.redis.scan_iter(
        f"{client.settings.keys.ready_prefix}*") for raw in client.redis.zrange(key, 0, -1)}
    assert not {f"plugins.{p}" for p in disabled} & indexed
    assert client.submit("many-050", "served").result(timeout=60)["payload"] == "served"
    assert [job.result(timeout=60) for job in slow] == ["woke up"] * 2
    for plugin_id in disabled:
        client.enable(plugin_id)
    assert [job.result(timeout=60)["payload"] for job in waiting] == disabled
    assert worker.alive()


def test_a_consumer_whose_registration_was_cut_short_registers_again(
        fleet: tuple[PluginClient, ManagedProcess]) -> None:
    """A worker whose start outlasts `consumer_dead_after_s` (10,000 plugins) is declared
    dead by a live consumer while it is still registering its queues: the rescuer removes
    its consumed-lists set, and its later registrations re-create only part of it. Here the
    first 40 plugins' lists are taken out of the set, as that left them. Its claims took
    those queues for another consumer's and their jobs waited for ever; the worker's next
    sweep now sees the set short and writes it whole again."""
    client, worker = fleet
    keys = client.settings.keys
    sets = list(client.redis.scan_iter(match=keys.consumes_prefix + "*", count=1000))
    assert len(sets) == 1, "one consumer: the module's worker"
    cut = [as_text(member) for member in client.redis.smembers(sets[0])
           if as_text(member).split("\x06")[0] < "plugins.many-040"]
    assert len(cut) >= 40
    client.redis.srem(sets[0], *cut)
    jobs = [client.submit(f"many-{p:03d}", p) for p in range(40)]
    assert [job.result(timeout=60)["payload"] for job in jobs] == list(range(40))
    assert set(cut) <= consumed_lists(client)
    assert worker.alive()
