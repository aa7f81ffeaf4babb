"""Manifests are validated whole: every problem listed, nothing registered on error."""

from __future__ import annotations

from pathlib import Path

import pytest

from pluginpool.policy.errors import ManifestError
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.manifest import load_manifest

BAD = """
[plugins.good]
name = "Good"
entrypoint = "pkg.mod:run"

[plugins.bad-limits]
name = "Bad limits"
entrypoint = "pkg.mod:run"
resource_limits = { max_memory_mb = -5, timeout_ms = "soon" }

[plugins.bad-entry]
name = "Bad entrypoint"
entrypoint = "not an entrypoint"
requires = { packages = ["not a requirement!!"] }

[plugins.BAD_ID]
name = "Bad id"
entrypoint = "pkg.mod:run"

[plugins.typo]
name = "Typo"
entrypoint = "pkg.mod:run"
isolaton = { sandboxed = false }

[plugins.self-fallback]
name = "Self"
entrypoint = "pkg.mod:run"
fallback = { plugin = "self-fallback" }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plugins.toml"
    path.write_text(text)
    return path


def test_every_problem_is_listed_with_file_plugin_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, BAD)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    found = {(issue.plugin_id, issue.field) for issue in info.value.issues}
    assert ("bad-limits", "resource_limits.max_memory_mb") in found
    assert ("bad-limits", "resource_limits.timeout_ms") in found
    assert ("bad-entry", "entrypoint") in found
    assert ("bad-entry", "requires.packages") in found
    assert ("BAD_ID", "id") in found
    assert ("typo", "isolaton") in found
    assert ("self-fallback", "fallback.plugin") in found
    assert all(issue.file == str(path) for issue in info.value.issues)
    assert "good" not in {issue.plugin_id for issue in info.value.issues}
    assert str(path) in str(info.value)


def test_toml_syntax_error_is_a_manifest_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path, "[plugins.x\nname="))
    assert info.value.issues[0].field == "<toml>"


def test_missing_file_and_empty_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError):
        load_manifest(tmp_path / "absent.toml")
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path, "title = 'x'\n"))
    assert {issue.field for issue in info.value.issues} == {"title", "plugins"}


def test_a_malformed_manifest_registers_nothing(client: PluginClient, tmp_path: Path) -> None:
    with pytest.raises(ManifestError):
        client.register(write(tmp_path, BAD))
    assert client.plugins() == []


def test_example_manifest_is_valid() -> None:
    specs = load_manifest(Path(__file__).resolve().parents[2] / "examples" / "plugins.toml")
    assert {spec.id for spec in specs} >= {"word-count", "flaky", "sleepy", "crasher"}
