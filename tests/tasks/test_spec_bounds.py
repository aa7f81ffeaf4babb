"""Limits the kernel or Redis cannot honour, and permissions the sandbox cannot match, are
refused at register with the field named; nothing is registered."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from pluginpool.policy.errors import ManifestError, UnknownOperationError
from pluginpool.policy.limits import ResourceLimits
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.spec import PluginSpec
from tests.conftest import make_settings

TOO_BIG = [
    ("resource_limits", "max_storage_kb", 9007199254740993),
    ("resource_limits", "max_memory_mb", 10_000_000),
    ("resource_limits", "timeout_ms", 10**12),
    ("resource_limits", "max_network_requests", 10**12),
    ("resource_limits", "max_cpu_percent", 101),
    ("isolation", "max_restarts", 1_000),
    ("isolation", "restart_cooldown_ms", 10**9),
]


def register_text(client: PluginClient, tmp_path: Path, table: str) -> ManifestError:
    path = tmp_path / "plugins.toml"
    path.write_text(f'[plugins.p]\nname = "P"\nentrypoint = "pkg.mod:run"\n{table}\n'
                    '[plugins.ok]\nname = "Ok"\nentrypoint = "pkg.mod:run"\n')
    with pytest.raises(ManifestError) as info:
        client.register(path)
    assert client.plugins() == []  # all or nothing
    return info.value


@pytest.mark.parametrize(("section", "field", "value"), TOO_BIG,
                         ids=[f"{s}.{f}" for s, f, _ in TOO_BIG])
def test_limits_over_their_bounds_are_refused_with_the_field_named(
        client: PluginClient, tmp_path: Path, section: str, field: str, value: int) -> None:
    error = register_text(client, tmp_path, f"{section} = {{ {field} = {value} }}")
    assert [(issue.plugin_id, issue.field) for issue in error.issues] == [
        ("p", f"{section}.{field}")]
    assert "less than or equal" in error.issues[0].problem


@pytest.mark.parametrize(("permissions", "field", "problem"), [
    ('network_hosts = ["http://api.example.com"]', "permissions.network_hosts", "not a URL"),
    ('network_hosts = ["api.example.com/v1"]', "permissions.network_hosts", "not a URL"),
    ('network_hosts = ["api.example.com:99999"]', "permissions.network_hosts", "port"),
    ('network_hosts = ["api.example.com:http"]', "permissions.network_hosts", "port"),
    ('network_hosts = ["bad host"]', "permissions.network_hosts", "host"),
    ('read_paths = ["data/models"]', "permissions.read_paths", "absolute"),
    ('read_paths = ["/srv/../etc"]', "permissions.read_paths", ".."),
])
def test_bad_permissions_are_refused_with_the_field_named(
        client: PluginClient, tmp_path: Path, permissions: str, field: str,
        problem: str) -> None:
    error = register_text(client, tmp_path, f"permissions = {{ {permissions} }}")
    assert [issue.field for issue in error.issues] == [field]
    assert problem in error.issues[0].problem


def test_good_permissions_and_limits_at_their_bounds_register(client: PluginClient) -> None:
    spec = PluginSpec.model_validate({
        "id": "edge", "name": "Edge", "entrypoint": "pkg.mod:run",
        "resource_limits": {"max_storage_kb": 4_194_304, "max_memory_mb": 65_536,
                            "timeout_ms": 60_000},
        "permissions": {"network_hosts": ["api.example.com", "10.0.0.1:8443", "::1"],
                        "read_paths": ["/srv/models", "/etc/ssl/certs/"]}})
    [published] = client.register(spec)
    assert published.resource_limits.max_storage_kb == 4_194_304


def test_a_spec_built_without_validation_is_checked_at_register(client: PluginClient) -> None:
    good = PluginSpec(id="sneaky", name="Sneaky", entrypoint="pkg.mod:run")
    bad = good.model_copy(update={"resource_limits": ResourceLimits.model_construct(
        max_storage_kb=9007199254740993, max_memory_mb=256, max_cpu_percent=100,
        max_network_requests=0, timeout_ms=1000)})
    with pytest.raises(ManifestError) as info:
        client.register(bad)
    assert [issue.field for issue in info.value.issues] == ["resource_limits.max_storage_kb"]
    assert client.plugins() == []


def test_a_restart_cooldown_reaching_the_visibility_timeout_is_refused(
        redis_url: str) -> None:
    settings = make_settings(redis_url, key_prefix=f"ppbounds:{uuid.uuid4().hex[:8]}:",
                             visibility_timeout_s=60)
    spec = PluginSpec.model_validate({
        "id": "slow-restart", "name": "Slow", "entrypoint": "pkg.mod:run",
        "resource_limits": {"timeout_ms": 1000},
        "isolation": {"restart_cooldown_ms": 120_000}})
    with PluginClient(settings) as client:
        with pytest.raises(ManifestError) as info:
            client.register(spec)
        assert [issue.field for issue in info.value.issues] == ["isolation.restart_cooldown_ms"]
        assert client.plugins() == []


@pytest.mark.parametrize("operation", ["run\n", "r\uff55n", "close", "_secret", "__init__",
                                       "x" * 65, "1run"])
def test_operation_names_are_ascii_method_names_and_never_the_teardown(
        client: PluginClient, operation: str) -> None:
    """Before, "run\\n" (a `$` that matches before a final newline), a full-width letter
    and `close` (the teardown, callable by a job) registered."""
    spec = PluginSpec.model_construct(**{
        **PluginSpec.model_validate({"id": "ops", "name": "ops",
                                     "entrypoint": "pkg.mod:Cls"}).__dict__,
        "operations": ["run", operation]})
    with pytest.raises(ManifestError) as info:
        client.register(spec)
    assert info.value.issues[0].field == "operations"


def test_a_spec_stored_under_the_older_rules_is_still_read(client: PluginClient) -> None:
    """A spec registered before the rules tightened (here with `close` listed) must still
    load: workers list every spec to start, and an operator must be able to unregister it."""
    stored = PluginSpec.model_validate({"id": "old-ops", "name": "old",
                                        "entrypoint": "pkg.mod:Cls"}).model_dump(mode="json")
    stored["operations"] = ["run", "close"]
    client.redis.hset(client.settings.keys.specs, "old-ops", json.dumps(stored))
    assert client.spec("old-ops").operations == ["run", "close"]
    assert "old-ops" in {spec.id for spec in client.plugins()}
    with pytest.raises(UnknownOperationError):  # still never callable by a job
        client.submit("old-ops", {}, operation="close")
    client.unregister("old-ops")


def test_ordinary_operation_names_register(client: PluginClient) -> None:
    [spec] = client.register(PluginSpec.model_validate({
        "id": "ops-fine", "name": "ops", "entrypoint": "pkg.mod:Cls",
        "operations": ["run", "summarize_2", "Keywords"]}))
    assert spec.operations == ["run", "summarize_2", "Keywords"]
