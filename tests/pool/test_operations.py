"""Operator actions end to end: a real worker, real Redis, the real CLI and HTTP API.

disable/enable (queued jobs wait, then run), drain, purge and cancel (every producer gets a
definitive outcome), breaker overrides and dead letters over HTTP, tokens and roles, and
the audit log that records every one of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pluginpool.policy.errors import (
    ActionRefusedError,
    JobCancelledError,
    PluginDisabledError,
    RevisionNotFoundError,
)
from pluginpool.pool.aggregator.auth import csrf_token
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.pool.tools.redis_bootstrap import free_port
from pluginpool.tasks.audit import Actor
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.spec import PluginSpec
from tests.conftest import TEST_PLUGINS, make_settings, retire, spawn_worker, worker_env

OPERATOR, VIEWER = "op-" + uuid.uuid4().hex, "view-" + uuid.uuid4().hex


class Api:
    """The aggregator as a subprocess, spoken to over HTTP."""

    def __init__(self, client: PluginClient, log_dir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = ManagedProcess(
            [sys.executable, "-m", "pluginpool.pool.tools.cli", "aggregator", "--port",
             str(self.port)],
            env=worker_env(client.settings), log_path=log_dir / f"aggregator-{self.port}.log")
        assert wait_until(lambda: self.call("GET", "/livez")[0] == 200, timeout_s=30), \
            self.proc.log_text()

    def call(self, method: str, path: str, *, token: str | None = None,
             body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(self.base + path, method=method,
                                         data=None if body is None else json.dumps(body).encode())
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        if body is not None:
            request.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")
        except OSError:
            return 0, None

    def act(self, path: str, token: str = OPERATOR) -> Any:
        status, body = self.call("POST", path, token=token, body={})
        assert status == 200, (status, body)
        return body


@pytest.fixture(scope="module")
def env(redis_url: str, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[PluginClient, Api]]:
    settings = make_settings(redis_url, key_prefix=f"ppops:{uuid.uuid4().hex[:8]}:",
                             api_tokens={OPERATOR: "operator", VIEWER: "viewer"},
                             worker_heartbeat_s=1.0, fleet_reconcile_s=1.0)
    client = PluginClient(settings)
    client.register(TEST_PLUGINS / "ops_plugins.toml")
    logs = tmp_path_factory.mktemp("ops")
    worker = spawn_worker(client, logs, plugins="ops-*", concurrency=2)
    api = Api(client, logs)
    yield client, api
    retire(api.proc, worker)
    client.close()


def consuming(client: PluginClient, queue: str) -> bool:
    workers = client.health_reader.roster.live(heartbeat_s=client.settings.worker_heartbeat_s)
    return any(queue in queues for queues in workers.values())


def test_disabled_plugin_refuses_submits_and_its_queued_jobs_run_after_enable(
        env: tuple[PluginClient, Api]) -> None:
    client, _ = env
    jobs = [client.submit("ops-sleep", {"seconds": 0.4}) for _ in range(8)]
    client.disable("ops-sleep")
    with pytest.raises(PluginDisabledError):
        client.submit("ops-sleep", {"seconds": 0})
    assert wait_until(lambda: not consuming(client, "plugins.ops-sleep"), timeout_s=10)
    health = client.health("ops-sleep")
    assert health.paused == "disabled"  # type: ignore[union-attr]
    assert health.reasons[0].startswith("disabled by an operator")  # type: ignore[union-attr]
    time.sleep(1.5)  # what was running has finished; the rest waits
    waiting = [job for job in jobs if not job.ready()]
    assert waiting, "every job ran although the plugin was disabled"
    assert client.queued("ops-sleep") >= 1
    assert all(job.state == "PENDING" for job in waiting)  # not failed, not lost
    client.enable("ops-sleep")
    assert [job.result(timeout=30) for job in jobs] == [{"slept": 0.4}] * 8
    assert client.submit("ops-sleep", {"seconds": 0}).result(timeout=20) == {"slept": 0}


def test_drain_refuses_new_jobs_and_reports_an_empty_queue(
        env: tuple[PluginClient, Api]) -> None:
    client, _ = env
    jobs = [client.submit("ops-sleep", {"seconds": 0.2}) for _ in range(4)]
    done = client.drain("ops-sleep", wait_s=30)
    assert done["drained"] and done["queued"] == 0 and done["mode"] == "draining"
    with pytest.raises(PluginDisabledError, match="draining"):
        client.submit("ops-sleep", {"seconds": 0})
    assert [job.result(timeout=20) for job in jobs] == [{"slept": 0.2}] * 4
    client.enable("ops-sleep")


def test_purge_gives_every_queued_job_a_cancelled_outcome(
        env: tuple[PluginClient, Api]) -> None:
    client, _ = env
    jobs = [client.submit("idle-ops", {"n": i}) for i in range(5)]
    assert client.purge("idle-ops")["purged"] == 5
    assert client.queued("idle-ops") == 0
    for job in jobs:
        with pytest.raises(JobCancelledError) as caught:
            job.result(timeout=5)
        assert caught.value.reason == "purged" and caught.value.job_id == job.id


def test_a_cancelled_queued_job_never_runs(env: tuple[PluginClient, Api]) -> None:
    client, _ = env
    runs_before = client.health("ops-sleep").runs  # type: ignore[union-attr]
    busy = [client.submit("ops-sleep", {"seconds": 1.0}) for _ in range(2)]
    queued = client.submit("ops-sleep", {"seconds": 0})
    client.cancel(queued.id, plugin_id="ops-sleep")
    with pytest.raises(JobCancelledError):
        queued.result(timeout=5)
    assert [job.result(timeout=20) for job in busy] == [{"slept": 1.0}] * 2
    time.sleep(1.0)
    assert client.health("ops-sleep").runs == runs_before + 2  # type: ignore[union-attr]
    with pytest.raises(JobCancelledError):
        queued.result(timeout=1)


def test_cancelling_a_running_job_kills_its_run(env: tuple[PluginClient, Api]) -> None:
    client, _ = env
    job = client.submit("ops-sleep", {"seconds": 45})

    def started() -> bool:
        active = client.app.control.inspect(timeout=0.5).active() or {}
        return any(task["id"] == job.id for tasks in active.values() for task in tasks)

    assert wait_until(started, timeout_s=20)
    cancelled_at = time.monotonic()
    result = client.cancel(job.id, actor=Actor(who="tester", origin="pytest"))
    assert result["workers_told"] >= 1
    with pytest.raises(JobCancelledError):
        job.result(timeout=5)
    assert wait_until(lambda: not started(), timeout_s=5)  # the worker is done with it
    assert time.monotonic() - cancelled_at < 5  # not the 45 s the run asked for
    assert client.submit("ops-sleep", {"seconds": 0}).result(timeout=20) == {"slept": 0}


def test_tokens_and_roles(env: tuple[PluginClient, Api]) -> None:
    client, api = env
    assert api.call("GET", "/health")[0] == 401
    assert api.call("GET", "/api/plugins/ops-echo", token="wrong")[0] == 401
    assert api.call("POST", "/api/plugins/ops-echo/disable", body={})[0] == 401
    status, page = api.call("GET", "/api/plugins/ops-echo", token=VIEWER)
    assert status == 200 and page["spec"]["id"] == "ops-echo"
    assert api.call("GET", "/health", token=VIEWER)[0] == 200
    status, body = api.call("POST", "/api/plugins/ops-echo/disable", token=VIEWER, body={})
    assert status == 403, body
    assert client.pause("ops-echo") is None
    # A browser's POST needs the page's CSRF token and the same origin.
    browser = {"Origin": api.base, "Sec-Fetch-Site": "same-origin"}
    assert api.call("POST", "/api/plugins/ops-echo/disable", token=OPERATOR, body={},
                    headers=browser)[0] == 403
    assert api.call("POST", "/api/plugins/ops-echo/disable", token=OPERATOR, body={},
                    headers={**browser, "Origin": "http://evil.example",
                             "X-CSRF-Token": csrf_token(OPERATOR)})[0] == 403
    assert api.call("POST", "/api/plugins/ops-echo/disable", token=OPERATOR, body={},
                    headers={**browser, "X-CSRF-Token": csrf_token(OPERATOR)})[0] == 200
    with pytest.raises(PluginDisabledError):
        client.submit("ops-echo", {})
    api.act("/api/plugins/ops-echo/enable")
    assert client.submit("ops-echo", {"x": 1}).result(timeout=20)["payload"] == {"x": 1}
    refused = [e for e in client.audit_log(target="/api/plugins/ops-echo/disable")
               if not e.ok]
    assert [e.role for e in refused] == ["operator", "operator", "viewer"]  # newest first


def test_every_action_over_http_is_audited(env: tuple[PluginClient, Api]) -> None:
    client, api = env
    since = time.time()
    api.act("/api/plugins/ops-echo/breaker-force-open")
    assert client.breaker("ops-echo").state == "open"
    api.act("/api/plugins/ops-echo/breaker-reset")
    assert client.breaker("ops-echo").state == "closed"
    jobs = [client.submit("idle-ops", {}) for _ in range(2)]
    assert api.act("/api/plugins/idle-ops/purge")["purged"] == 2
    queued = client.submit("idle-ops", {})
    api.act(f"/api/jobs/{queued.id}/cancel")
    for job in [*jobs, queued]:
        with pytest.raises(JobCancelledError):
            job.result(timeout=5)
    api.act("/api/plugins/ops-echo/drain")
    api.act("/api/plugins/ops-echo/enable")
    keys = client.settings.keys
    entry = {"id": "dl-1", "reason": "test", "queue": "plugins.ops-echo", "raw": "{}",
             "requeueable": False, "first_seen": time.time(), "at": time.time()}
    client.redis.hset(keys.dead_letter, "dl-1", json.dumps(entry))
    client.redis.zadd(keys.dead_letter_index, {"dl-1": time.time()})
    status, listed = api.call("GET", "/api/deadletters", token=VIEWER)
    assert status == 200 and [e["id"] for e in listed["entries"]] == ["dl-1"]
    assert api.call("POST", "/api/deadletters/dl-1/requeue", token=OPERATOR, body={})[0] == 409
    api.act("/api/deadletters/dl-1/discard")
    assert api.call("POST", "/api/deadletters/dl-1/discard", token=OPERATOR, body={})[0] == 404
    status, audit = api.call("GET", "/api/audit?limit=50", token=VIEWER)
    http = [e for e in audit["entries"] if e["at"] >= since]
    assert [(e["action"], e["ok"]) for e in reversed(http)] == [
        ("breaker-force-open", True), ("breaker-reset", True), ("purge", True),
        ("cancel", True), ("drain", True), ("enable", True), ("deadletter-requeue", False),
        ("deadletter-discard", True), ("deadletter-discard", False)]
    assert all(e["origin"] == "http 127.0.0.1" and e["who"].startswith("token:")
               and OPERATOR not in json.dumps(e) for e in http)


def test_cli_actions_are_audited_as_the_cli(env: tuple[PluginClient, Api]) -> None:
    client, _ = env

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pluginpool.pool.tools.cli", *args],
                              env=worker_env(client.settings), capture_output=True,
                              text=True, timeout=60, check=False)

    assert json.loads(cli("disable", "ops-echo").stdout)["mode"] == "disabled"
    refused = cli("submit", "ops-echo", "--payload", "{}")
    assert refused.returncode == 2 and "PluginDisabledError" in refused.stderr
    assert json.loads(cli("enable", "ops-echo").stdout)["was"] == "disabled"
    entries = json.loads(cli("audit", "--json", "--target", "ops-echo").stdout)
    assert [e["action"] for e in entries[:2]] == ["enable", "disable"]
    assert all(e["origin"] == "cli" for e in entries[:2])


def raw_request(api: Api, text: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request written by hand (what urllib will not send), its status, headers
    and body."""
    import socket

    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as conn:
        conn.sendall(text.encode())
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def test_bad_requests_get_the_right_status_as_json_at_once(
        env: tuple[PluginClient, Api]) -> None:
    """Before: a non-JSON body 409, a body over 64 KiB 409, deep JSON and an offset past
    Redis's integers 503, a negative Content-Length held the request 30 s, other methods
    an HTML 501, `?limit=abc` on the audit silently 100."""
    _, api = env
    auth = f"Authorization: Bearer {OPERATOR}\r\nContent-Type: application/json\r\n"
    action = "/api/plugins/ops-echo/breaker-reset"
    for body, status in [("notjson", 400), ("{" * 5000, 400), ("x" * 70_000, 413)]:
        code, headers, answer = raw_request(
            api, f"POST {action} HTTP/1.1\r\nHost: x\r\n{auth}"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}")
        assert code == status and headers["Content-Type"] == "application/json", answer
    started = time.monotonic()
    code, _, _ = raw_request(api, f"POST {action} HTTP/1.1\r\nHost: x\r\n{auth}"
                                  "Content-Length: -1\r\nConnection: close\r\n\r\n{}")
    assert code == 400 and time.monotonic() - started < 10
    for method in ("PUT", "DELETE", "HEAD"):
        code, headers, answer = raw_request(api, f"{method} /health HTTP/1.1\r\nHost: x\r\n"
                                                 "Connection: close\r\n\r\n")
        assert code == 405 and headers["Allow"] == "GET, POST"
        assert (answer == b"") == (method == "HEAD")  # a HEAD answer has no body
    code, headers, answer = raw_request(api, "BREW / HTTP/1.1\r\nHost: x\r\n"
                                             "Connection: close\r\n\r\n")
    assert code == 501 and headers["Content-Type"] == "application/json"
    assert json.loads(answer)["error"] == "Not Implemented"
    for path in ("/api/audit?limit=abc", "/api/audit?limit=0", "/health?limit=-1",
                 "/api/deadletters?offset=99999999999999999999999999"):
        status, body = api.call("GET", path, token=VIEWER)
        assert status == 400, (path, status, body)
    code, _, _ = raw_request(api, f"GET /api/whoami HTTP/1.1\r\nHost: x\r\n"
                                  f"Authorization: Bearer {VIEWER}\r\n"
                                  f"Authorization: Bearer {OPERATOR}\r\n"
                                  "Connection: close\r\n\r\n")
    assert code == 400  # which of two tokens would count?
    status, _ = api.call("POST", action, token=OPERATOR, body={},
                         headers={"Content-Type": "application/jsonx"})
    assert status == 415


def test_cancel_refuses_what_is_no_job_id_and_says_when_it_knows_no_such_job(
        env: tuple[PluginClient, Api]) -> None:
    """Before: `cancel ''` was a Python traceback; a typo'd id was cancelled as if it were a
    pending job ("was": "PENDING")."""
    client, api = env
    with pytest.raises(ActionRefusedError):
        client.cancel("")
    status, body = api.call("POST", "/api/jobs/" + "x" * 300 + "/cancel", token=OPERATOR,
                            body={})
    assert status == 409, body
    status, _ = api.call("GET", "/health/ops%2Decho", token=VIEWER)  # segments decoded
    assert status == 200
    unknown = client.cancel(f"typo-{uuid.uuid4().hex}")
    assert unknown["was"] == "unknown" and "no record of this job" in unknown["note"]
    job = client.submit("ops-sleep", {"seconds": 3})
    assert wait_until(lambda: job.status() == "started", timeout_s=20)
    running = client.cancel(job.id, plugin_id="ops-sleep")
    assert running["was"] == "started" and "note" not in running
    with pytest.raises(ActionRefusedError, match="already ended \\(cancelled\\)"):
        client.cancel(job.id)


def test_unregister_and_rollback_are_audited(env: tuple[PluginClient, Api]) -> None:
    """They were not: an operator's removal of a plugin or return to old code left no
    entry, and a failed rollback no trace."""
    client, _ = env
    plugin = f"ops-audited-{uuid.uuid4().hex[:6]}"
    for version in ("1.0", "2.0"):
        client.register(PluginSpec(id=plugin, name="A", version=version,
                                   entrypoint="pp_testplugins.basic:echo"))
    client.rollback(plugin)
    with pytest.raises(RevisionNotFoundError):
        client.rollback(plugin, to=99)
    client.unregister(plugin)
    entries = client.audit_log(limit=10, target=plugin)
    assert [(e.action, e.ok) for e in entries] == [
        ("unregister", True), ("rollback", False), ("rollback", True)]
    assert entries[2].result["revision"] == 3
    with pytest.raises(ValueError):
        client.audit_log(limit=0)
