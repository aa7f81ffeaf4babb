"""Reading every plugin's health in two passes reads the per-minute history only where it
can hold something, and gives the same answer as reading each plugin in full."""

from __future__ import annotations

import time

from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.spec import PluginSpec


def spec(plugin_id: str) -> PluginSpec:
    return PluginSpec(id=plugin_id, name=plugin_id, entrypoint="pp_testplugins.basic:echo")


def test_read_all_matches_single_reads_for_active_idle_and_restart_only_plugins(
        client: PluginClient) -> None:
    keys = client.settings.keys
    ids = ["h-active", "h-idle", "h-restarted", "h-stale"]
    client.register([spec(pid) for pid in ids])
    now_ms = int(time.time() * 1000)
    minute = now_ms // 60000
    store = client.redis
    # Active: an outcome stamped now and this minute's figures.
    store.hset(keys.health("h-active"), mapping={"runs": 2, "succeeded": 2,
                                                  "last_success_ms": now_ms})
    store.hset(f"{keys.health_minute_prefix('h-active')}{minute}", mapping={"runs": 2})
    # Restarts only (a run restarted, its retry not finished): no outcome stamp.
    store.hset(keys.health("h-restarted"), mapping={"restarts": 1})
    store.hset(f"{keys.health_minute_prefix('h-restarted')}{minute}", mapping={"restarts": 1})
    # Its last outcome an hour ago: its minutes have expired.
    store.hset(keys.health("h-stale"), mapping={"runs": 1, "failed:plugin": 1,
                                                 "last_error_ms": now_ms - 3_600_000})

    everyone = {item.plugin_id: item for item in client.health_reader.read_all(
        [client.registry.get(pid) for pid in ids])}
    for pid in ids:
        alone = client.health_reader.read(client.registry.get(pid))
        assert everyone[pid].recent.model_dump(exclude={"history"}) == \
            alone.recent.model_dump(exclude={"history"}), pid
        assert [m["runs"] for m in everyone[pid].recent.history] == \
            [m["runs"] for m in alone.recent.history]
    assert everyone["h-active"].recent.runs == 2
    assert everyone["h-restarted"].recent.restarts == 1
    assert everyone["h-idle"].recent.runs == 0 and everyone["h-stale"].recent.runs == 0
