"""An instance's records are written only while it exists (an unload deletes them once),
and still written when Redis lost the script that writes them."""

from __future__ import annotations

from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.instances import InstanceStore
from pluginpool.tasks.runs import RecentRuns, after_run
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


def test_a_runs_logs_reach_its_instance_when_redis_lost_the_script(
        client: PluginClient) -> None:
    """The instance's writes go by EVALSHA: a NOSCRIPT reply loads the script and writes
    again (the recent run, written beside it, is not written twice)."""
    client.register(PluginSpec.model_validate({"id": "logged", "name": "logged",
                                               "entrypoint": "pkg.mod:run"}))
    keys = client.settings.keys
    iid = client.load("logged", {})
    client.redis.script_flush()
    after_run(client.redis, keys, "logged", job_id="j1", ok=True, duration_ms=1.0,
              error=None, logs="stdout: hello\n", worker="w", instance_id=iid,
              log_level="INFO")
    assert client.redis.hget(keys.instance_usage(iid), "last_logs") == "stdout: hello\n"
    assert len(RecentRuns(client.redis, keys).read("logged")) == 1
