"""The CLI, run as a subprocess, shows plugin text literally and refuses too-deep payloads."""

from __future__ import annotations

import json
import subprocess
import sys

from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.spec import PluginSpec
from tests.conftest import worker_env
from tests.pool.test_cli import cli

ODD_TEXT = ["[/x]", "[bold red]loud", ":thumbs_up:", "[link=http://evil]x[/link]"]


def wide_cli(client: PluginClient, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with a terminal wide enough that no table cell is wrapped."""
    return subprocess.run([sys.executable, "-m", "pluginpool.pool.tools.cli", *args],
                          env={**worker_env(client.settings), "COLUMNS": "300"},
                          capture_output=True, text=True, timeout=60, check=False)


def test_plugin_text_is_never_interpreted_as_markup(client: PluginClient) -> None:
    client.register([PluginSpec(id=f"odd-{n}", name=text, version=text,
                                entrypoint="pkg.mod:run") for n, text in enumerate(ODD_TEXT)])
    listed = wide_cli(client, "plugins")
    assert listed.returncode == 0, listed.stderr
    for text in ODD_TEXT:
        assert text in listed.stdout
    health = wide_cli(client, "health")
    assert health.returncode == 0, health.stderr
    assert "odd-0" in health.stdout
    breaker = cli(client, "breaker", "odd-0")
    assert breaker.returncode == 0, breaker.stderr


def test_too_deep_payloads_are_refused_by_the_cli_and_nothing_is_enqueued(
        client: PluginClient) -> None:
    [spec] = client.register(PluginSpec(id="deep-target", name="Deep", entrypoint="pkg.mod:run"))
    for depth in (900, 5_000):
        done = cli(client, "submit", spec.id, "--payload", "[" * depth + "]" * depth)
        assert done.returncode == 2, (depth, done.stdout, done.stderr)
        error = json.loads((done.stdout + done.stderr).strip().splitlines()[-1])
        assert error["error"] == "PayloadTooDeepError"
    assert client.redis.llen(spec.queue) == 0


def test_wait_and_follow_together_are_refused_before_anything_is_enqueued(
        client: PluginClient) -> None:
    """They were both accepted (and --follow won); they are two ways of waiting."""
    [spec] = client.register(PluginSpec(id="wait-or-follow", name="W", entrypoint="pkg.mod:run"))
    done = cli(client, "submit", "wait-or-follow", "--wait", "--follow")
    assert done.returncode == 2
    assert "not allowed with argument" in done.stderr
    assert client.redis.llen(spec.queue) == 0
