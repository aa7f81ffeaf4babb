"""Payloads too deep for encoders, decoders and pickle are refused at submit (and again by
the worker's parse_job), with a typed error and nothing enqueued."""

from __future__ import annotations

from typing import Any

import pytest

from pluginpool.policy.errors import InvalidJobError, InvalidPayloadError, PayloadTooDeepError
from pluginpool.pool.job_request import parse_job
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.payload import nesting_depth
from pluginpool.tasks.spec import PluginSpec


def nested(depth: int, *, leaf: Any = 1, as_dict: bool = False) -> Any:
    """A value nested `depth` levels deep, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = {"k": value} if as_dict else [value]
    return value


@pytest.fixture
def routed(client: PluginClient) -> PluginSpec:
    """A plugin nobody consumes, so its queue shows exactly what was enqueued."""
    [spec] = client.register(PluginSpec(id="unconsumed-depth", name="Unconsumed",
                                        entrypoint="pkg.mod:run"))
    client.redis.delete(spec.queue)
    return spec


def test_depth_is_measured_without_recursion_and_stops_at_the_limit() -> None:
    assert nesting_depth(1, limit=64) == 0
    assert nesting_depth([], limit=64) == 1
    assert nesting_depth({"a": [1, {"b": []}], "c": 2}, limit=64) == 4
    assert nesting_depth(nested(64, as_dict=True), limit=64) == 64
    assert nesting_depth(nested(100_000), limit=64) == 65  # no RecursionError
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    assert nesting_depth(cyclic, limit=10) == 11


@pytest.mark.parametrize("depth", [65, 900, 5_000, 100_000])
def test_too_deep_payloads_are_refused_at_submit(client: PluginClient, routed: PluginSpec,
                                                 depth: int) -> None:
    with pytest.raises(PayloadTooDeepError) as info:
        client.submit(routed.id, nested(depth, as_dict=depth % 2 == 0))
    assert isinstance(info.value, InvalidPayloadError)
    assert info.value.depth_limit == client.settings.max_payload_depth == 64
    assert info.value.field == "payload"
    assert client.redis.llen(routed.queue) == 0


def test_a_payload_at_the_limit_is_accepted(client: PluginClient, routed: PluginSpec) -> None:
    client.submit(routed.id, nested(64))
    assert client.redis.llen(routed.queue) == 1
    client.redis.delete(routed.queue)


def test_load_refuses_non_object_and_too_deep_initial_data(client: PluginClient,
                                                           routed: PluginSpec) -> None:
    for bad in ([1, 2], "text", 3):
        with pytest.raises(InvalidPayloadError) as info:
            client.load(routed.id, initial_data=bad)  # type: ignore[arg-type]
        assert info.value.field == "initial_data"
    with pytest.raises(PayloadTooDeepError):
        client.load(routed.id, initial_data={"deep": nested(5_000)})
    assert client.instances.of_plugin(routed.id) == []
    assert client.instance(client.load(routed.id, initial_data={})).initial_data == {}


def test_parse_job_refuses_a_too_deep_payload_from_any_producer() -> None:
    assert parse_job((nested(10),), {}, max_depth=10).payload == nested(10)
    with pytest.raises(InvalidJobError, match="deeper than the 10-level limit"):
        parse_job((nested(11),), {}, max_depth=10)
    with pytest.raises(InvalidJobError, match="deeper"):
        parse_job((), {"payload": nested(100_000)})


def test_the_depth_setting_is_capped_below_what_pickle_survives(redis_url: str) -> None:
    from pluginpool.policy.errors import SettingsError
    from pluginpool.tasks.settings import Settings

    assert Settings.from_env(_env_file=None, max_payload_depth=8).max_payload_depth == 8
    with pytest.raises(SettingsError, match="PLUGINPOOL_MAX_PAYLOAD_DEPTH"):
        Settings.from_env(_env_file=None, max_payload_depth=257)
