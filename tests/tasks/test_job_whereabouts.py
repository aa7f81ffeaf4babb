"""A benchmark's job without an outcome says where it is (bench/job_whereabouts.py)."""

from __future__ import annotations

import json
import uuid

import redis

from bench.job_whereabouts import RESULT_PREFIX, describe, whereabouts
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.spec import PluginSpec


def test_a_queued_job_nobody_waits_on_is_found_on_its_list_and_said_unindexed(
        client: PluginClient) -> None:
    """No worker consumes the plugin: the job is on its queue list, no group waits on the
    queue, it is in no ready index, nobody holds it; once a result is stored, that shows."""
    plugin_id = f"where-{uuid.uuid4().hex[:6]}"
    client.register(PluginSpec(id=plugin_id, name=plugin_id,
                               entrypoint="pp_testplugins.basic:echo"))
    job = client.submit(plugin_id, 1)
    store = redis.Redis.from_url(client.settings.redis_url)
    found = whereabouts(store, client.settings.keys, job_id=job.id, queue=f"plugins.{plugin_id}")
    assert found["queue_lists"] == {f"plugins.{plugin_id}": {"length": 1, "job_at": [0]}}
    assert found["ready_index"] == {} and found["waiters"] == [] and found["unacked"] == []
    assert found["job_status"] == ["queued"] and found["result_status"] is None
    assert "still queued, NOT in any ready index" in describe(found)
    store.set(RESULT_PREFIX + job.id, json.dumps({"status": "SUCCESS", "result": 1}))
    found = whereabouts(store, client.settings.keys, job_id=job.id, queue=f"plugins.{plugin_id}")
    assert "result stored (SUCCESS): the waiter missed it" in describe(found)
    store.delete(f"plugins.{plugin_id}", RESULT_PREFIX + job.id)
