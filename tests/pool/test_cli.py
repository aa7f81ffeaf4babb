"""The `pluginpool` command, run as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pluginpool.tasks.client import PluginClient
from tests.conftest import TEST_PLUGINS, WorkerStarter, worker_env


def cli(client: PluginClient, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pluginpool.pool.tools.cli", *args],
                          env=worker_env(client.settings), capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_register_and_list(client: PluginClient) -> None:
    done = cli(client, "register", str(TEST_PLUGINS / "test_plugins.toml"))
    assert done.returncode == 0, done.stderr
    assert "registered echo" in done.stdout
    listed = json.loads(cli(client, "plugins", "--json").stdout)
    assert "echo" in {spec["id"] for spec in listed}


def test_register_rejects_a_malformed_manifest(client: PluginClient, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[plugins.x]\nname = "X"\nentrypoint = "nope"\n')
    done = cli(client, "register", str(bad))
    assert done.returncode == 2
    error = json.loads(done.stderr.strip().splitlines()[-1])
    assert error["error"] == "ManifestError"
    assert "entrypoint" in error["message"]


def test_submit_wait_and_count(test_plugins: PluginClient, start_worker: WorkerStarter) -> None:
    start_worker(test_plugins, plugins="echo,raises")
    done = cli(test_plugins, "submit", "echo", "--payload", '{"a": 1}', "--wait")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["value"]["payload"] == {"a": 1}
    failed = cli(test_plugins, "submit", "raises", "--payload", '"k"', "--wait")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"]["type"] == "runtime"
    many = cli(test_plugins, "submit", "echo", "--count", "25", "--wait")
    assert json.loads(many.stdout)["succeeded"] == 25


def test_worker_refuses_unknown_plugins(client: PluginClient) -> None:
    done = cli(client, "worker", "--plugins", "ghost")
    assert done.returncode == 2
    assert "ghost" in done.stderr
