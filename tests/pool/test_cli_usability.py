"""The `pluginpool` command's manners: help and defaults on every option, --version, a
global --redis-url, distinct exit codes, readable errors on a terminal and JSON otherwise,
and a summary (not a list of ids) for --count."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest

from pluginpool.pool.tools.cli import build_parser, main
from pluginpool.pool.tools.cli_output import options_without_help
from pluginpool.tasks.client import PluginClient
from tests.conftest import worker_env

OPERATOR_COMMANDS = ("disable", "enable", "drain", "purge", "cancel", "audit")
"""Being written now by the operator-actions work (pool/tools/ops_cli.py); checked once it lands."""


def cli(client: PluginClient, *args: str, **options: object
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pluginpool.pool.tools.cli", *args],
                          env=worker_env(client.settings), capture_output=True, text=True,
                          timeout=60, check=False, **options)  # type: ignore[call-overload]


def test_every_option_has_help_text() -> None:
    missing = [option for option in options_without_help(build_parser())
               if option.split()[1] not in OPERATOR_COMMANDS]
    assert missing == []


def help_text(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*args, "--help"] if args != ("--version",) else list(args))
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["submit", "worker", "job", "demo", "health", "flower"])
def test_help_shows_defaults(capsys: pytest.CaptureFixture[str], command: str) -> None:
    assert "(default:" in help_text(capsys, command)


def test_top_level_help_names_the_exit_codes_and_version(
        capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys)
    for expected in ("--redis-url", "--version", "3 a wait for a job timed out", "4 Redis"):
        assert expected in text
    assert help_text(capsys, "--version").startswith("pluginpool ")
    assert "--reset" in help_text(capsys, "demo") and "--follow" in help_text(capsys, "submit")


def test_exit_codes_bad_input_timeout_unreachable(test_plugins: PluginClient) -> None:
    unknown = cli(test_plugins, "submit", "ghost")
    assert unknown.returncode == 2
    assert json.loads(unknown.stderr)["error"] == "UnknownPluginError"
    assert cli(test_plugins, "submit", "echo", "--payload", "{nope").returncode == 2
    assert cli(test_plugins, "submit", "--bogus-option").returncode == 2
    # No worker runs here: the wait times out, exit 3, and the job stays queued.
    waited = cli(test_plugins, "submit", "echo", "--wait", "--timeout", "0.5")
    assert waited.returncode == 3
    assert json.loads(waited.stderr)["error"] == "JobWaitTimeoutError"
    followed = cli(test_plugins, "--json", "submit", "echo", "--follow", "--timeout", "0.5")
    assert followed.returncode == 3
    assert json.loads(followed.stdout.splitlines()[0])["status"] == "queued"
    away = cli(test_plugins, "--redis-url", "redis://127.0.0.1:1/0", "plugins")
    assert away.returncode == 4
    assert json.loads(away.stderr)["error"] == "BrokerUnavailableError"


def test_the_global_redis_url_wins_over_the_environment(test_plugins: PluginClient) -> None:
    env = {**worker_env(test_plugins.settings), "PLUGINPOOL_REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run(
        [sys.executable, "-m", "pluginpool.pool.tools.cli", "--redis-url",
         test_plugins.settings.redis_url, "plugins", "--json"],
        env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "echo" in {spec["id"] for spec in json.loads(done.stdout)}


def test_errors_on_a_terminal_are_readable_and_json_with_the_flag(
        test_plugins: PluginClient) -> None:
    def on_terminal(*args: str) -> str:
        leader, follower = pty.openpty()
        subprocess.run([sys.executable, "-m", "pluginpool.pool.tools.cli", *args],
                       env=worker_env(test_plugins.settings), stdout=subprocess.DEVNULL,
                       stderr=follower, timeout=60, check=False)
        os.close(follower)
        return os.read(leader, 65536).decode()

    readable = on_terminal("submit", "ghost")
    assert readable.startswith("error: ") and "{" not in readable.splitlines()[0]
    assert json.loads(on_terminal("--json", "submit", "ghost"))["error"] == "UnknownPluginError"


def test_count_prints_a_summary_not_the_ids(test_plugins: PluginClient) -> None:
    done = cli(test_plugins, "submit", "echo", "--count", "50")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["count"] == 50 and summary["enqueued"] == 50
    assert "job_ids" not in summary and len(done.stdout) < 300
    with_ids = json.loads(cli(test_plugins, "submit", "echo", "--count", "3", "--ids").stdout)
    assert len(with_ids["job_ids"]) == 3
