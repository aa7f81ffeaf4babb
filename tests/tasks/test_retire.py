"""Jobs on an unregistered plugin's queue all get an outcome, even when a sweep dies midway,
and what is not a job is set aside, not dropped (tasks/retire.py, tasks/retire.lua)."""

from __future__ import annotations

import uuid

import pytest

from pluginpool.policy.errors import ErrorType, PluginExecutionError
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.delivery_record import RETIRE, run_script
from pluginpool.tasks.retire import (
    BATCH,
    PRIORITY_STEPS,
    holding_list,
    queue_lists,
    sweep_unregistered,
)
from pluginpool.tasks.spec import PluginSpec


def gone_plugin(client: PluginClient) -> PluginSpec:
    plugin_id = f"retire-{uuid.uuid4().hex[:8]}"  # a queue of its own in the shared database
    [spec] = client.register(PluginSpec.model_validate(
        {"id": plugin_id, "name": "Retired", "entrypoint": "pkg.mod:run"}))
    client.unregister(plugin_id)
    return spec


def late_job(client: PluginClient, spec: PluginSpec) -> str:
    """A job that reaches the queue after the unregister (a producer bypassing the
    registry)."""
    return str(client.app.send_task(spec.task_name, kwargs={"payload": {}},
                                     queue=spec.queue).id)


def test_a_job_held_by_a_sweep_that_died_is_failed_by_the_next(client: PluginClient) -> None:
    spec = gone_plugin(client)
    job_ids = [late_job(client, spec) for _ in range(3)]
    # A sweeper that moved the jobs to the holding list and died before storing failures:
    keys = [*queue_lists(spec.queue), holding_list(spec.queue)]
    [held] = run_script(client.redis, RETIRE, keys, [len(PRIORITY_STEPS) + 1, BATCH])
    assert len(held) == 3 and client.redis.llen(spec.queue) == 0
    assert client.redis.llen(holding_list(spec.queue)) == 3
    assert sweep_unregistered(client.app, {spec.id: (spec.queue, spec.revision)}) == 3
    for job_id in job_ids:
        with pytest.raises(PluginExecutionError) as info:
            client.job(job_id, plugin_id=spec.id).result(timeout=10)
        assert info.value.type is ErrorType.DEPENDENCY
        assert info.value.details["unregistered"] is True
    assert client.redis.llen(holding_list(spec.queue)) == 0


def test_many_plugins_in_one_sweep_and_a_non_job_is_dead_lettered(
        client: PluginClient) -> None:
    specs = [gone_plugin(client) for _ in range(5)]
    jobs = {spec.id: [late_job(client, spec) for _ in range(BATCH + 20)] for spec in specs[:2]}
    client.redis.lpush(specs[2].queue, b"not a celery message")
    plugins = {spec.id: (spec.queue, spec.revision) for spec in specs}
    assert sweep_unregistered(client.app, plugins) == 2 * (BATCH + 20)
    for spec in specs:
        for name in (*queue_lists(spec.queue), holding_list(spec.queue)):
            assert client.redis.llen(name) == 0
    for plugin_id, ids in jobs.items():
        with pytest.raises(PluginExecutionError):
            client.job(ids[-1], plugin_id=plugin_id).result(timeout=10)
    letters = [d for d in client.dead_letters()[1] if d.queue == specs[2].queue]
    assert len(letters) == 1 and "not a job" in letters[0].reason
    assert sweep_unregistered(client.app, plugins) == 0  # nothing left: nothing failed twice
