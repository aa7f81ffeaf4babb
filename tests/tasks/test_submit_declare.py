"""A submit does not declare its plugin's queue (tasks/client.py `_declare_free`)."""

from __future__ import annotations

import uuid

from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.spec import PluginSpec


def test_a_submit_publishes_without_declaring_the_queue(client: PluginClient) -> None:
    """kombu would declare the queue at the first publish to it on each connection (two
    transactions on Redis: the queue's length and an exchange binding). The job still lands
    on its queue list, through the anonymous exchange, which reads no binding."""
    plugin_id = f"nodecl-{uuid.uuid4().hex[:6]}"
    client.register(PluginSpec(id=plugin_id, name=plugin_id,
                               entrypoint="pp_testplugins.basic:echo"))
    job = client.submit(plugin_id, 1)
    queue = f"plugins.{plugin_id}"
    assert client.redis.llen(queue) == 1
    assert not client.redis.exists(f"_kombu.binding.{queue}")
    assert client.job_watcher.store.current(job.id) == "queued"
    client.redis.delete(queue)
