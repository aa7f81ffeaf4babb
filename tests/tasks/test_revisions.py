"""The registry's revision log, rollback, unregister and change events."""

from __future__ import annotations

import json
import time

import pytest

from pluginpool.policy.errors import PluginUnregisteredError, RevisionNotFoundError
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.spec import PluginSpec


def spec(plugin_id: str = "alpha", **extra: object) -> PluginSpec:
    return PluginSpec.model_validate({"id": plugin_id, "name": plugin_id.title(),
                                      "entrypoint": "pkg.mod:run", **extra})


def test_revision_log_records_version_when_and_who(client: PluginClient) -> None:
    before = time.time()
    client.register(spec(version="1.0.0"), by="alice@host")
    client.register(spec(version="1.0.0"), by="bob@host")  # unchanged: no new revision
    client.register(spec(version="1.1.0"))
    records = client.revisions("alpha")
    assert [(r.revision, r.version, r.action) for r in records] == [
        (1, "1.0.0", "register"), (2, "1.1.0", "register")]
    assert records[0].by == "alice@host"
    assert records[1].by and "@" in records[1].by
    assert all(r.at is not None and r.at >= before for r in records)


def test_rollback_appends_a_revision_with_the_old_content(client: PluginClient) -> None:
    client.register(spec(version="1.0.0"))
    client.register(spec(version="2.0.0"))
    client.register(spec(version="3.0.0"))
    assert (client.rollback("alpha").version, client.spec("alpha").revision) == ("2.0.0", 4)
    back = client.rollback("alpha", to=1)
    assert (back.revision, back.version) == (5, "1.0.0")
    records = client.revisions("alpha")
    assert [(r.action, r.restored_revision) for r in records[-2:]] == [
        ("rollback", 2), ("rollback", 1)]
    assert [s.revision for s in client.registry.history("alpha")] == [4, 3, 2, 1]
    with pytest.raises(RevisionNotFoundError) as info:
        client.rollback("alpha", to=42)
    assert info.value.available == [4, 3, 2, 1]


def test_unregister_refuses_submit_and_register_again_revives(client: PluginClient) -> None:
    client.register(spec(version="1.0.0"))
    assert client.unregister("alpha") == 0
    with pytest.raises(PluginUnregisteredError) as info:
        client.submit("alpha", {})
    assert info.value.last_revision == 1
    assert client.registry.unregistered() == {"alpha": 1}
    [again] = client.register(spec(version="1.0.0"))
    # Revisions go on: a worker that set revision 1 up must not take this for it.
    assert again.revision == 2 and client.registry.unregistered() == {}
    assert [r.action for r in client.revisions("alpha")] == ["register", "unregister",
                                                            "register"]


def test_every_change_is_announced_on_the_registry_channel(client: PluginClient) -> None:
    pubsub = client.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe(client.settings.keys.registry_channel)
    pubsub.get_message(timeout=1)
    client.register(spec(version="1.0.0"))
    client.register(spec(version="2.0.0"))
    client.rollback("alpha")
    client.unregister("alpha")
    events = []
    deadline = time.monotonic() + 5
    while len(events) < 4 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message:
            events.append(json.loads(message["data"]))
    pubsub.close()
    assert [(e["action"], e["revision"]) for e in events] == [
        ("register", 1), ("register", 2), ("rollback", 3), ("unregister", 3)]


def test_a_producer_sees_a_new_revision_at_once(client: PluginClient) -> None:
    """Another producer's cached spec is dropped by the change event, not after the TTL."""
    from pluginpool.tasks.client import PluginClient as Producer

    client.register(spec(version="1.0.0"))
    with Producer(client.settings) as other:
        assert other.spec("alpha").revision == 1
        client.register(spec(version="2.0.0"))
        deadline = time.monotonic() + 2
        while other.spec("alpha").revision != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert other.spec("alpha").revision == 2
        assert client.settings.spec_cache_ttl_s >= 5


def test_an_instance_of_an_unregistered_plugin_can_still_be_looked_at(
        client: PluginClient) -> None:
    """Before, sandbox_info raised PluginUnregisteredError although unload still worked."""
    client.register(spec(version="1.0.0"))
    iid = client.load("alpha", {})
    client.unregister("alpha")
    info = client.sandbox_info(iid)
    assert info.plugin_id == "alpha" and info.sandboxed is True and info.runs == 0
    client.unload(iid)


def test_unregister_and_rollback_with_redis_down_raise_the_typed_error() -> None:
    """Audited since this stop: the audit entry of their failure went to the same Redis,
    and its ConnectionError replaced the typed one (the CLI printed a traceback)."""
    from pluginpool.policy.errors import BrokerUnavailableError
    from pluginpool.tasks.settings import Settings

    gone = Settings(_env_file=None, redis_url="redis://127.0.0.1:1/0",  # type: ignore[call-arg]
                    redis_socket_timeout_s=0.5)
    with PluginClient(gone) as client:
        with pytest.raises(BrokerUnavailableError):
            client.unregister("alpha")
        with pytest.raises(BrokerUnavailableError):
            client.rollback("alpha")


def test_a_new_revision_moves_an_open_breaker_to_half_open(client: PluginClient) -> None:
    """The breaker judged the old code: a fix registered waited out the old code's backoff
    (helper probe: 236 s). A new revision (register or rollback) now lets its trials run
    the new code at once; an unchanged re-register and an operator's force-open stay."""
    from pluginpool.policy.breaker import BreakerState
    from pluginpool.policy.errors import ErrorType

    def trip(plugin_id: str) -> None:  # a job (a trial, when half-open) that fails
        spec = client.spec(plugin_id)
        permit = client.breakers.acquire(plugin_id, spec.breaker,
                                         default_open_ms=spec.default_open_ms)
        client.breakers.record(plugin_id, spec.breaker, default_open_ms=spec.default_open_ms,
                               error_type=ErrorType.DEPENDENCY, duration_ms=1.0,
                               generation=permit.generation)
        assert client.breaker(plugin_id).state is BreakerState.OPEN

    breaker = {"open_ms": 600_000}
    client.register(spec(version="1.0.0", breaker=breaker))
    trip("alpha")
    client.register(spec(version="1.0.0", breaker=breaker))  # unchanged: no new revision
    assert client.breaker("alpha").state is BreakerState.OPEN
    client.register(spec(version="1.0.1", breaker=breaker))
    status = client.breaker("alpha")
    assert status.state is BreakerState.HALF_OPEN and status.reason == "new revision registered"
    trip("alpha")  # a failing trial reopens it
    client.rollback("alpha")
    assert client.breaker("alpha").state is BreakerState.HALF_OPEN
    client.force_open_breaker("alpha")
    client.register(spec(version="1.0.2", breaker=breaker))
    assert client.breaker("alpha").state is BreakerState.OPEN  # an operator's stays
