"""An instance's storage goes with it: a write after `unload` (a run still in flight) is
refused, so nothing of the instance is left in Redis for good."""

from __future__ import annotations

import pytest

from pluginpool.policy.errors import InstanceUnloadedError
from pluginpool.policy.storage import InstanceStorage
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.spec import PluginSpec


def test_a_write_after_unload_is_refused_and_leaves_nothing(client: PluginClient) -> None:
    client.register(PluginSpec(id="keeps", name="Keeps", entrypoint="pkg.mod:run"))
    keys = client.settings.keys
    iid = client.load("keeps")
    storage = InstanceStorage(client.redis, keys, iid, quota_bytes=4096)
    assert storage.set("a", [1, 2]) > 0 and storage.get("a") == [1, 2]
    client.unload(iid)
    assert not client.redis.exists(keys.storage(iid), keys.storage_used(iid))
    with pytest.raises(InstanceUnloadedError) as info:
        storage.set("b", "late write from a run in flight")
    assert info.value.instance_id == iid
    assert [key for key in client.redis.scan_iter(match=f"{keys.prefix}*") if iid in key] == []


def test_plugin_scoped_storage_needs_no_instance(client: PluginClient) -> None:
    storage = InstanceStorage(client.redis, client.settings.keys, "plugin:keeps",
                              quota_bytes=4096)
    assert storage.set("k", "v") > 0 and storage.get("k") == "v"
