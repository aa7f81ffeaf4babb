"""Bad input is refused at submit with a typed error, and nothing is enqueued."""

from __future__ import annotations

import pytest

from pluginpool.policy.errors import (
    BrokerUnavailableError,
    InvalidPayloadError,
    PayloadTooLargeError,
    UnknownInstanceError,
    UnknownPluginError,
)
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec


@pytest.fixture
def routed(client: PluginClient) -> PluginClient:
    """A plugin nobody consumes, so its queue shows exactly what was enqueued."""
    client.register(PluginSpec(id=f"unconsumed-{client.settings.key_prefix[7:15]}",
                               name="Unconsumed", entrypoint="pkg.mod:run",
                               resource_limits={"timeout_ms": 4000}))  # type: ignore[arg-type]
    return client


def plugin_of(client: PluginClient) -> PluginSpec:
    return client.plugins()[0]


def test_a_job_goes_to_the_plugins_own_queue_with_its_time_limits(routed: PluginClient) -> None:
    spec = plugin_of(routed)
    routed.redis.delete(spec.queue)
    job = routed.submit(spec.id, {"x": 1})
    raw = routed.redis.lrange(spec.queue, 0, -1)
    assert len(raw) == 1
    import json

    message = json.loads(raw[0])
    assert message["headers"]["task"] == f"plugin.{spec.id}"
    assert message["headers"]["id"] == job.id
    # Celery's clocks sit behind the sandbox's own (setup 30 s + run 4 s + 2 s margin,
    # then 10 %): policy/deadlines.py.
    deadlines = spec.deadlines
    assert message["headers"]["timelimit"] == [deadlines.celery_hard_s, deadlines.celery_soft_s]
    assert deadlines.celery_soft_s == 30 + 4 + 2
    assert message["content-type"] == "application/json"
    routed.redis.delete(spec.queue)


@pytest.mark.parametrize(("payload", "error"), [
    ({"when": object()}, InvalidPayloadError),
    ({"nan": float("nan")}, InvalidPayloadError),
    ({"blob": "x" * 1_100_000}, PayloadTooLargeError),
])
def test_bad_payloads_are_refused(routed: PluginClient, payload: object,
                                  error: type[Exception]) -> None:
    spec = plugin_of(routed)
    routed.redis.delete(spec.queue)
    with pytest.raises(error):
        routed.submit(spec.id, payload)
    assert routed.redis.llen(spec.queue) == 0


def test_unknown_plugin_and_instance_are_refused(routed: PluginClient) -> None:
    spec = plugin_of(routed)
    routed.redis.delete(spec.queue)
    with pytest.raises(UnknownPluginError):
        routed.submit("no-such-plugin", {})
    with pytest.raises(UnknownInstanceError):
        routed.submit(spec.id, {}, instance_id="no-such-instance")
    with pytest.raises(UnknownInstanceError):
        routed.execute("no-such-instance", {})
    assert routed.redis.llen(spec.queue) == 0


def test_instances_round_trip_and_unload(routed: PluginClient) -> None:
    spec = plugin_of(routed)
    iid = routed.load(spec.id, initial_data={"k": "v"})
    assert routed.instance(iid).initial_data == {"k": "v"}
    assert routed.instances.of_plugin(spec.id) == [iid]
    routed.unload(iid)
    with pytest.raises(UnknownInstanceError):
        routed.instance(iid)
    with pytest.raises(UnknownPluginError):
        routed.load("no-such-plugin")


def test_unreachable_redis_fails_fast_with_a_clear_error() -> None:
    import time

    settings = Settings(_env_file=None, redis_url="redis://127.0.0.1:1/0",  # type: ignore[call-arg]
                        redis_socket_timeout_s=1)
    started = time.monotonic()
    with PluginClient(settings) as client, pytest.raises(BrokerUnavailableError):
        client.submit("anything", {})
    assert time.monotonic() - started < 10
