"""An instance's records are written only while it exists: an unload deletes them once."""

from __future__ import annotations

from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.instances import InstanceStore
from pluginpool.tasks.spec import PluginSpec


def test_a_failure_marked_after_unload_does_not_recreate_the_instance(
        client: PluginClient) -> None:
    """Before, a check and then a write: an unload in between left a key with only status
    and last_error, which every later write took for a live instance."""
    client.register(PluginSpec.model_validate({"id": "marked", "name": "marked",
                                               "entrypoint": "pkg.mod:run"}))
    store = InstanceStore(client.redis, client.settings.keys)
    live = client.load("marked", {})
    store.mark_failed(live, {"type": "runtime"})
    assert client.redis.hget(client.settings.keys.instance(live), "status") == "failed"
    gone = client.load("marked", {})
    client.unload(gone)
    store.mark_failed(gone, {"type": "runtime"})
    assert not client.redis.exists(client.settings.keys.instance(gone))
