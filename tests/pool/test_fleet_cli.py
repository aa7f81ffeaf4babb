"""`pluginpool revisions`, `rollback` and `unregister`, run as an operator would."""

from __future__ import annotations

import json
import subprocess
import sys

from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.spec import PluginSpec
from tests.conftest import worker_env


def cli(client: PluginClient, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pluginpool.pool.tools.cli", *args],
                          env=worker_env(client.settings), capture_output=True, text=True,
                          timeout=60, check=False)


def test_revisions_rollback_and_unregister(client: PluginClient) -> None:
    for version in ("1.0.0", "2.0.0"):
        client.register(PluginSpec(id="ops", name="Ops", version=version,
                                   entrypoint="pkg.mod:run"), by="ci@test")
    listed = cli(client, "revisions", "ops", "--json")
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)
    assert [(r["revision"], r["version"], r["by"], r["current"]) for r in records] == [
        (1, "1.0.0", "ci@test", False), (2, "2.0.0", "ci@test", True)]

    rolled = cli(client, "rollback", "ops", "--to", "1")
    assert rolled.returncode == 0, rolled.stderr
    assert "revision 3 is now current (version 1.0.0)" in rolled.stdout
    assert client.spec("ops").version == "1.0.0"

    gone = cli(client, "unregister", "ops")
    assert gone.returncode == 0, gone.stderr
    refused = cli(client, "submit", "ops", "--payload", "{}")
    assert refused.returncode == 2
    assert json.loads(refused.stderr.strip().splitlines()[-1])["error"] == \
        "PluginUnregisteredError"
    missing = cli(client, "rollback", "nope")
    assert missing.returncode == 2 and "UnknownPluginError" in missing.stderr
