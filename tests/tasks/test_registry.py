"""The registry is shared in Redis, versioned, and publishes all-or-nothing."""

from __future__ import annotations

import pytest

from pluginpool.policy.errors import ManifestError, UnknownPluginError
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec


def spec(plugin_id: str = "alpha", **extra: object) -> PluginSpec:
    return PluginSpec.model_validate({"id": plugin_id, "name": plugin_id.title(),
                                      "entrypoint": "pkg.mod:run", **extra})


def test_publish_assigns_revisions_and_keeps_history(client: PluginClient) -> None:
    [first] = client.register(spec(version="1.0.0"))
    assert first.revision == 1
    [same] = client.register(spec(version="1.0.0"))
    assert same.revision == 1
    [second] = client.register(spec(version="1.1.0"))
    assert second.revision == 2
    assert client.spec("alpha").version == "1.1.0"
    assert [old.version for old in client.registry.history("alpha")] == ["1.0.0"]


def test_another_client_sees_the_same_specs(client: PluginClient, settings: Settings) -> None:
    client.register([spec("alpha"), spec("beta")])
    with PluginClient(settings) as other:
        assert [s.id for s in other.plugins()] == ["alpha", "beta"]


def test_unknown_plugin(client: PluginClient) -> None:
    with pytest.raises(UnknownPluginError):
        client.spec("nope")


def test_fallback_must_name_a_known_plugin(client: PluginClient) -> None:
    with pytest.raises(ManifestError) as info:
        client.register(spec(fallback={"plugin": "ghost"}))
    assert info.value.issues[0].field == "fallback.plugin"
    client.register([spec("ghost"), spec(fallback={"plugin": "ghost"})])
    assert client.spec("alpha").fallback is not None


def test_timeout_must_stay_below_the_visibility_timeout(redis_url: str) -> None:
    from tests.conftest import make_settings

    settings = make_settings(redis_url, key_prefix="pptest:vis:", visibility_timeout_s=100)
    with PluginClient(settings) as client, pytest.raises(ManifestError) as info:
        client.register([spec("ok"), spec("slow", resource_limits={"timeout_ms": 120_000})])
    assert info.value.issues[0].plugin_id == "slow"
    assert "visibility" in info.value.issues[0].problem
    with PluginClient(settings) as client:
        assert client.plugins() == []


def test_queue_and_task_names() -> None:
    assert spec("word-count").queue == "plugins.word-count"
    assert spec("word-count").task_name == "plugin.word-count"


def test_deployment_defaults_fill_what_a_spec_leaves_out(redis_url: str) -> None:
    from tests.conftest import make_settings

    settings = make_settings(redis_url, key_prefix="pptest:defaults:",
                             default_limits={"timeout_ms": 1234, "max_memory_mb": 64},
                             default_isolation={"max_restarts": 7})
    with PluginClient(settings) as client:
        client.redis.delete(settings.keys.specs)
        [published] = client.register(spec(resource_limits={"max_memory_mb": 512}))
    assert published.resource_limits.timeout_ms == 1234
    assert published.resource_limits.max_memory_mb == 512
    assert published.isolation.max_restarts == 7


def test_limits_that_reach_the_visibility_timeout_are_refused_naming_them(
        client: PluginClient) -> None:
    """A sandboxed job's hard limit covers its setup and its run: a long setup alone can
    reach the visibility timeout (3600 s), and the refusal names both fields (it named
    timeout_ms alone, a field the user had set to 3 s)."""
    with pytest.raises(ManifestError) as info:
        client.register(spec("long-setup", resource_limits={"setup_timeout_ms": 3_580_000,
                                                             "timeout_ms": 3000}))
    [issue] = info.value.issues
    assert "setup_timeout_ms" in issue.field and "setup_timeout_ms 3580000" in issue.problem
    with pytest.raises(ManifestError) as info:
        client.register(spec("long-run", resource_limits={"timeout_ms": 3_600_000},
                             isolation={"sandboxed": False}))
    [issue] = info.value.issues
    assert issue.field == "resource_limits.timeout_ms"
    with pytest.raises(UnknownPluginError):
        client.spec("long-setup")
