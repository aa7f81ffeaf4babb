"""A producer keeps specs while it follows registry events, and drops them all when its
subscription's connection comes back (an event published while it was down is lost)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from pluginpool.policy.errors import PluginUnregisteredError
from pluginpool.pool.tools.processes import wait_until
from pluginpool.tasks.client import FOLLOWED_SPEC_TTL_S, PluginClient
from pluginpool.tasks.registry import SpecCache
from pluginpool.tasks.spec import PluginSpec


def spec(version: str) -> PluginSpec:
    return PluginSpec(id="follow-me", name="follow-me", version=version,
                      entrypoint="pp_testplugins.basic:echo")


def test_specs_are_kept_while_followed_and_dropped_when_the_subscription_reconnects(
        client: PluginClient) -> None:
    keys = client.settings.keys
    client.register(spec("1.0.0"))
    assert client.spec("follow-me").version == "1.0.0"  # starts following
    assert client._specs._ttl_s >= FOLLOWED_SPEC_TTL_S
    with PluginClient(client.settings) as other:  # a change heard of: dropped at once
        other.register(spec("2.0.0"))
    assert wait_until(lambda: client.spec("follow-me").version == "2.0.0", timeout_s=10)

    # A change whose event never arrives (written without one, as if published while the
    # subscription was down): the cached spec stays...
    stored = json.loads(client.redis.hget(keys.specs, "follow-me") or "{}")
    client.redis.hset(keys.specs, "follow-me", json.dumps({**stored, "version": "3.0.0"}))
    assert client.spec("follow-me").version == "2.0.0"
    # ...until the subscription's connection drops and comes back: every spec is dropped.
    pubsub: Any = client._subscriptions._pubsub
    host, port = pubsub.connection._sock.getsockname()[:2]
    client.redis.client_kill(f"{host}:{port}")
    assert wait_until(lambda: client.spec("follow-me").version == "3.0.0", timeout_s=10)


def test_a_following_producer_reads_every_spec_at_once_not_one_per_plugin(
        client: PluginClient) -> None:
    """Jobs spread over many plugins: the first submit's spec read brings every spec (one
    bulk read), so no later plugin costs a registry read of its own; a plugin registered
    since is read on its own, and an unregistered one is refused as before."""
    client.register([PluginSpec(id=f"bulk-{i:02d}", name=f"bulk-{i:02d}",
                                entrypoint="pp_testplugins.basic:echo") for i in range(20)])
    assert client.spec("bulk-00").id == "bulk-00"
    reads: list[str] = []
    registry: Any = client._specs._registry
    read_one = registry.get
    registry.get = lambda plugin_id: reads.append(plugin_id) or read_one(plugin_id)
    assert [client.spec(f"bulk-{i:02d}").id for i in range(1, 20)] == [
        f"bulk-{i:02d}" for i in range(1, 20)]
    assert reads == []
    with PluginClient(client.settings) as other:
        other.register(PluginSpec(id="bulk-new", name="bulk-new",
                                  entrypoint="pp_testplugins.basic:echo"))
        other.unregister("bulk-05")
    assert client.spec("bulk-new").id == "bulk-new" and reads == ["bulk-new"]
    assert wait_until(lambda: "bulk-05" not in (client._specs._snapshot or {}), timeout_s=10)
    with pytest.raises(PluginUnregisteredError):
        client.spec("bulk-05")


def test_a_worker_cache_past_its_age_bound_reads_specs_in_bulk_until_the_generation_moves(
        client: PluginClient) -> None:
    """A pool process's cache (generation-driven, as the worker builds it): entries past
    the age bound come back from one bulk read, not one registry read each, while the
    registry's change counter stands still; a new generation (a change the worker heard
    of) brings the changed spec."""
    client.register([PluginSpec(id=f"aged-{i}", name=f"aged-{i}",
                                entrypoint="pp_testplugins.basic:echo") for i in range(5)])
    generation = [0]
    cache = SpecCache(client.registry, ttl_s=0.05, generation=lambda: generation[0])
    cache.follow(0.05)
    cache.prime(client.registry.all())
    reads: list[str] = []
    registry: Any = client.registry
    read_one = registry.get
    registry.get = lambda plugin_id: reads.append(plugin_id) or read_one(plugin_id)
    for _ in range(3):
        time.sleep(0.1)  # every entry past its age bound
        assert [cache.get(f"aged-{i}").id for i in range(5)] == [f"aged-{i}" for i in range(5)]
    assert reads == []
    client.register(PluginSpec(id="aged-2", name="aged-2", version="2.0.0",
                               entrypoint="pp_testplugins.basic:echo"))
    generation[0] += 1
    assert cache.get("aged-2").version == "2.0.0"


def test_a_spec_from_the_snapshot_is_kept_no_longer_than_the_snapshot_is_trusted(
        client: PluginClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spec first taken from the bulk snapshot is as old as the snapshot's last check:
    a change whose event was missed is seen `ttl_s` after that check, not `ttl_s` after
    the plugin was first looked up (which kept it up to twice as long)."""
    import pluginpool.tasks.registry as registry_module

    class Clock:
        now = 1_000.0

        def monotonic(self) -> float:
            return self.now

        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

    clock = Clock()
    monkeypatch.setattr(registry_module, "time", clock)
    one = PluginSpec(id="snap-one", name="one", entrypoint="pp_testplugins.basic:echo")
    two = PluginSpec(id="snap-two", name="two", version="1.0.0",
                     entrypoint="pp_testplugins.basic:echo")
    client.register([one, two])
    cache = SpecCache(client.registry, ttl_s=10)
    cache.follow(10)
    assert cache.get("snap-one").id == "snap-one"  # the snapshot is read at 1,000
    with PluginClient(client.settings) as other:  # a change this cache hears nothing of
        other.register(two.model_copy(update={"version": "2.0.0"}))
    clock.now = 1_005.0
    assert cache.get("snap-two").version == "1.0.0"  # from the snapshot, still trusted
    clock.now = 1_011.0  # past the snapshot's check by ttl, not past this lookup
    assert cache.get("snap-two").version == "2.0.0"


def test_a_snapshot_read_while_a_change_is_heard_of_is_not_kept(
        client: PluginClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """An event handled (on the subscriber thread) while the bulk read is under way: the
    read may hold the plugin as it was before the change, so it is not kept."""
    plugin = PluginSpec(id="snap-raced", name="raced", version="1.0.0",
                        entrypoint="pp_testplugins.basic:echo")
    client.register(plugin)
    cache = SpecCache(client.registry, ttl_s=60)
    cache.follow(60)
    read = client.registry.raw_specs

    def read_then_hear_a_change(*, limit: int) -> Any:
        before = read(limit=limit)  # holds 1.0.0
        with PluginClient(client.settings) as other:
            other.register(plugin.model_copy(update={"version": "2.0.0"}))
        cache.invalidate("snap-raced")  # the event, heard while this read was under way
        return before

    monkeypatch.setattr(client.registry, "raw_specs", read_then_hear_a_change)
    assert cache.get("snap-raced").version == "2.0.0"
