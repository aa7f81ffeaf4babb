"""`pluginpool demo --duration S --json` runs the examples end to end and stops by itself."""

from __future__ import annotations

import json
import subprocess
import sys

from pluginpool.tasks.client import PluginClient
from tests.conftest import worker_env


def test_demo_runs_and_reports_every_kind_of_outcome(client: PluginClient) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pluginpool.pool.tools.cli", "demo", "--duration", "15", "--json"],
        env=worker_env(client.settings), capture_output=True, text=True, timeout=120,
        check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    plugins = summary["plugins"]
    assert plugins["word-count"]["succeeded"] > 0
    assert plugins["flaky"]["failed"].get("runtime", 0) > 0
    assert plugins["sleepy"]["failed"].get("timeout", 0) > 0
    assert plugins["needs-missing"]["failed"].get("dependency", 0) > 0
    assert summary["totals"]["runs"] == sum(p["runs"] for p in plugins.values())
    assert plugins["needs-missing"]["refused"] > 0  # a dependency error opens its breaker
