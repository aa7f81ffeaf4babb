"""Plugins declared by an installed distribution (entry points `pluginpool.plugins` and
its pluginpool.toml), found without importing them and registered by name.

The distribution is a local wheel built in the test and installed offline into a target
directory (pip --no-index --target), which the CLI sees through PYTHONPATH."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pluginpool.policy.errors import ManifestError
from pluginpool.tasks.artifacts import build_wheel
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.discovery import discover
from tests.conftest import worker_env

PYPROJECT = """\
[build-system]
requires = ["setuptools>=70.1"]
build-backend = "setuptools.build_meta"

[project]
name = "acme-greeters"
version = "2.3.0"

[project.entry-points."pluginpool.plugins"]
greet = "acme_greeters.core:greet"
shout = "acme_greeters.core:shout"

[tool.setuptools]
packages = ["acme_greeters"]

[tool.setuptools.package-data]
acme_greeters = ["pluginpool.toml"]
"""

MANIFEST = """\
[plugins.greet]
name = "Greeter"
resource_limits = { timeout_ms = 1500 }
isolation = { sandboxed = false }
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("discovery")
    project = root / "project"
    package = project / "acme_greeters"
    package.mkdir(parents=True)
    (project / "pyproject.toml").write_text(PYPROJECT)
    (package / "__init__.py").write_text("")
    (package / "core.py").write_text(
        "raise_on_import = True\n"  # discovery must never import plugin code
        "def greet(ctx, payload):\n    return 'hello ' + payload\n"
        "def shout(ctx, payload):\n    return payload.upper()\n")
    (package / "pluginpool.toml").write_text(MANIFEST)
    (root / "build").mkdir()
    wheel = build_wheel(project, plugin_id="greet", version="2.3.0", work_dir=root / "build")
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-index", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=120)
    return target


def test_discover_reads_entry_points_and_their_manifest(installed: Path) -> None:
    found = {plugin.spec.id: plugin for plugin in discover([str(installed)])}
    assert sorted(found) == ["greet", "shout"]
    greet, shout = found["greet"], found["shout"]
    assert greet.spec.entrypoint == "acme_greeters.core:greet"
    assert greet.spec.name == "Greeter" and greet.spec.version == "2.3.0"
    assert greet.spec.resource_limits.timeout_ms == 1500
    assert greet.spec.isolation.sandboxed is False
    assert greet.manifest_file and greet.manifest_file.endswith("pluginpool.toml")
    assert (shout.spec.name, shout.distribution) == ("shout", "acme-greeters")
    assert "acme_greeters.core" not in sys.modules


def test_cli_discover_and_register_entry_points(client: PluginClient, installed: Path) -> None:
    env = {**worker_env(client.settings)}
    env["PYTHONPATH"] = ":".join(p for p in (str(installed), env.get("PYTHONPATH")) if p)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pluginpool.pool.tools.cli", *args], env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    listed = cli("discover", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [p["id"] for p in json.loads(listed.stdout)] == ["greet", "shout"]
    done = cli("register", "--entry-points", "greet")
    assert done.returncode == 0, done.stderr
    assert "registered greet 2.3.0 (revision 1)" in done.stdout
    assert [spec.id for spec in client.plugins()] == ["greet"]
    assert client.spec("greet").resource_limits.timeout_ms == 1500
    missing = cli("register", "--entry-points", "nope")
    assert missing.returncode == 2
    assert "nope" in missing.stderr


def test_register_entry_points_refuses_unknown_names(client: PluginClient,
                                                     installed: Path) -> None:
    with pytest.raises(ManifestError):
        client.register_entry_points(["nope"], paths=[str(installed)])
    published = client.register_entry_points(paths=[str(installed)])
    assert sorted(spec.id for spec in published) == ["greet", "shout"]
