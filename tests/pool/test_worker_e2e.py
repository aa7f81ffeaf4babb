"""The whole path of a job on real Redis and a real prefork worker."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from pluginpool.policy.errors import ErrorType, PluginExecutionError
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.deadletter import DeadLetterStore
from pluginpool.tasks.health import queues_digest
from tests.conftest import TEST_PLUGINS, make_settings, retire, spawn_worker


@pytest.fixture(scope="module", params=[True, False], ids=["sandboxed", "in-pool"])
def env(request: pytest.FixtureRequest, redis_url: str,
        tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[PluginClient, ManagedProcess]]:
    """One worker for the module, serving every test plugin, once with every plugin
    sandboxed (the default) and once with every plugin run in the pool child.

    The breaker is set never to open here: these tests pin down the job path itself, and
    repeat failures on purpose; tests/pool/test_breaker_e2e.py covers the breaker.
    """
    settings = make_settings(redis_url, key_prefix=f"ppe2e:{uuid.uuid4().hex[:8]}:",
                             default_breaker={"minimum_calls": 10_000, "open_at_once_types": []},
                             default_isolation={"sandboxed": request.param})
    client = PluginClient(settings)
    client.register(TEST_PLUGINS / "test_plugins.toml")
    worker = spawn_worker(client, tmp_path_factory.mktemp("e2e"), concurrency=2)
    yield client, worker
    retire(worker)
    client.close()


def run_error(client: PluginClient, plugin: str, payload: object = None,
              timeout: float = 30) -> PluginExecutionError:
    job = client.submit(plugin, payload)
    with pytest.raises(PluginExecutionError) as info:
        job.result(timeout=timeout)
    assert info.value.job_id == job.id
    assert info.value.plugin_id == plugin
    return info.value


def test_success_returns_value_and_instance_data(env: tuple[PluginClient, ManagedProcess]) -> None:
    client, _ = env
    iid = client.load("echo", initial_data={"lang": "en"})
    job = client.submit("echo", {"text": "hi"}, instance_id=iid)
    value = job.result(timeout=20)
    assert value["payload"] == {"text": "hi"}
    assert value["initial_data"] == {"lang": "en"}
    assert job.meta["plugin_id"] == "echo"
    assert job.meta["instance_id"] == iid
    assert client.execute(iid, {"n": 2}, timeout=20)["payload"] == {"n": 2}
    client.unload(iid)


def test_runtime_error_is_typed_with_exception_and_traceback(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    error = run_error(env[0], "raises", "field-x")
    assert error.type is ErrorType.RUNTIME
    assert error.details["exception_type"] == "KeyError"
    assert "field-x" in error.message
    assert "Traceback" in error.details["traceback"]


def test_soft_timeout_is_a_timeout_error(env: tuple[PluginClient, ManagedProcess]) -> None:
    started = time.monotonic()
    error = run_error(env[0], "sleeps", {"seconds": 30})
    assert error.type is ErrorType.TIMEOUT
    assert error.details["limit_value"] == 500
    assert time.monotonic() - started < 10


def test_hard_timeout_kills_a_plugin_that_swallows_the_soft_limit(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    started = time.monotonic()
    error = run_error(env[0], "swallows", {"seconds": 60})
    assert error.type is ErrorType.TIMEOUT
    if env[0].spec("swallows").isolation.sandboxed:
        assert error.details["limit"] == "timeout_ms"  # the supervisor's wall clock
    else:
        assert error.details["celery_exception"] == "TimeLimitExceeded"
    assert time.monotonic() - started < 15
    assert env[0].submit("echo", 1).result(timeout=20)["payload"] == 1


@pytest.mark.parametrize("plugin", ["missing-package", "missing-plugin", "broken-import"])
def test_unmet_requirements_are_dependency_errors_never_retried(
        env: tuple[PluginClient, ManagedProcess], plugin: str) -> None:
    error = run_error(env[0], plugin, {})
    assert error.type is ErrorType.DEPENDENCY
    assert error.details["attempt"] == 1


def test_dependency_details_name_what_is_missing(env: tuple[PluginClient, ManagedProcess]) -> None:
    error = run_error(env[0], "missing-package", {})
    assert error.details["unmet_packages"] == [
        {"requirement": "no-such-distribution-xyz>=2", "installed": "none"}]
    error = run_error(env[0], "missing-plugin", {})
    assert error.details["unmet_plugins"] == ["never-registered"]


def test_a_dying_process_is_restarted_a_bounded_number_of_times(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, worker = env
    started = time.monotonic()
    job = client.submit("crashes", {})
    with pytest.raises(PluginExecutionError) as info:
        job.result(timeout=60)
    elapsed = time.monotonic() - started
    assert info.value.type is ErrorType.RUNTIME
    assert info.value.details["restarts_exhausted"] is True
    assert info.value.details["max_restarts"] == 2
    assert elapsed >= 0.6  # two cooldowns of 300 ms
    time.sleep(1.5)  # an endless redelivery loop would keep logging retries
    retries = worker.log_text().count(f"plugin.crashes[{job.id}] retry")
    assert retries == 2
    assert worker.alive()
    assert client.submit("echo", "after").result(timeout=20)["payload"] == "after"


def test_no_restart_when_auto_restart_is_off(env: tuple[PluginClient, ManagedProcess]) -> None:
    error = run_error(env[0], "crashes-no-restart", {})
    assert error.type is ErrorType.RUNTIME
    assert error.details["max_restarts"] == 0


def test_a_restart_can_recover_the_job(env: tuple[PluginClient, ManagedProcess]) -> None:
    assert env[0].submit("crashes-once", {}).result(timeout=30) == {"attempt": 2}


def test_results_must_be_json_and_within_the_result_limit(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, _ = env
    error = run_error(client, "not-json", {})
    assert error.type is ErrorType.RUNTIME
    assert "JSON" in error.message
    error = run_error(client, "too-large", {"bytes": 2_000_000})
    assert error.type is ErrorType.RESOURCE
    assert error.details["limit"] == "max_result_bytes"
    assert error.details["observed"] > error.details["limit_value"]


def test_sys_exit_in_a_plugin_is_a_runtime_error(env: tuple[PluginClient, ManagedProcess]) -> None:
    error = run_error(env[0], "calls-exit", {})
    assert error.type is ErrorType.RUNTIME
    assert error.details["exception_type"] == "SystemExit"


def test_plain_celery_producer_can_enqueue_by_name_and_queue(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, _ = env
    url = client.settings.redis_url
    plain = Celery("foreign", broker=url, backend=url, set_as_current=False)
    plain.conf.update(task_serializer="json", accept_content=["json"],
                      result_accept_content=["json"])
    result = plain.send_task("plugin.echo", args=[{"from": "plain"}], queue="plugins.echo")
    envelope = result.get(timeout=20)
    assert envelope["value"]["payload"] == {"from": "plain"}
    bad = plain.send_task("plugin.echo", kwargs={"nonsense": 1}, queue="plugins.echo")
    with pytest.raises(Exception) as info:
        bad.get(timeout=20)
    assert type(info.value).__name__ == "InvalidJobError"
    assert "unknown arguments" in str(info.value)
    plain.close()


def _kombu_message(body: str, content_type: str, headers: dict[str, object]) -> str:
    return json.dumps({
        "body": base64.b64encode(body.encode()).decode(), "content-type": content_type,
        "content-encoding": "utf-8", "headers": headers,
        "properties": {"delivery_tag": uuid.uuid4().hex, "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": "plugins.echo"}}})


def test_unparsable_messages_are_rejected_and_the_worker_lives_on(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, worker = env
    foreign = [
        "this is not a kombu message {",                       # not JSON at all
        "[1, 2, 3]",                                             # JSON, not a message
        _kombu_message("x", "application/x-python-serialize",
                       {"task": "plugin.echo", "id": uuid.uuid4().hex}),
        _kombu_message("[[], {}, {}]", "application/json",
                       {"task": "plugin.not-registered", "id": uuid.uuid4().hex}),
        # Indexable as unacked (it has a tag) but its body is not base64: dead-lettered,
        # and its unacked record dropped so the restore sweep never brings it back.
        json.dumps({"body": "%%% not base64", "headers": {},
                    "properties": {"delivery_tag": "bad-body-tag", "body_encoding": "base64",
                                   "delivery_info": {"exchange": "", "routing_key": "x"}}}),
    ]
    for item in foreign:
        client.redis.lpush("plugins.echo", item)
    assert client.submit("echo", "still here").result(timeout=20)["payload"] == "still here"
    assert worker.alive()
    log = worker.log_text()
    assert "dead-lettered a message from queue plugins.echo: message is not JSON" in log
    assert "message is a JSON list, not an object" in log
    assert "body is not valid base64" in log
    assert not client.redis.hexists("unacked", "bad-body-tag")
    assert "content type 'application/x-python-serialize' is not application/json" in log
    assert "Received unregistered task of type 'plugin.not-registered'" in log
    dead = DeadLetterStore(client.redis, client.settings.keys).list(limit=1000)
    assert {entry.reason.split(":")[0] for entry in dead} >= {
        "message is not JSON", "message is a JSON list, not an object",
        "body is not valid base64"}


def test_a_duplicated_message_runs_again_under_the_same_job_id(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    """At-least-once: a message delivered twice is run twice, one job id, one outcome."""
    client, worker = env
    url = client.settings.redis_url
    plain = Celery("dup", broker=url, backend=url, set_as_current=False)
    plain.conf.update(task_serializer="json", accept_content=["json"],
                      result_accept_content=["json"])
    holding = f"pp-holding-{uuid.uuid4().hex[:6]}"
    result = plain.send_task("plugin.echo", args=[{"dup": 1}], queue=holding)
    raw = client.redis.rpop(holding)
    assert raw is not None
    client.redis.lpush("plugins.echo", raw, raw)
    assert result.get(timeout=20)["value"]["payload"] == {"dup": 1}
    assert wait_until(lambda: worker.log_text().count(f"plugin.echo[{result.id}] succeeded")
                      == 2, timeout_s=20)
    assert worker.alive()
    plain.close()


def test_two_workers_share_a_queue(env: tuple[PluginClient, ManagedProcess],
                                   tmp_path: Path) -> None:
    client, first = env
    second = spawn_worker(client, tmp_path, plugins="echo", concurrency=2)
    try:
        jobs = [client.submit("echo", i) for i in range(60)]
        workers = set()
        for job in jobs:
            job.result(timeout=30)
            workers.add(job.meta["worker"])
        assert workers == {first.nodename, second.nodename}  # type: ignore[attr-defined]
    finally:
        retire(second)


def test_heartbeat_carries_a_digest_and_the_queue_list_is_written_apart(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    """A heartbeat stays small whatever the plugin count: the queue list is written beside
    it, once per change, and readers resolve it by digest."""
    client, worker = env
    keys = client.settings.keys
    node = worker.nodename  # type: ignore[attr-defined]
    assert wait_until(lambda: client.redis.hexists(keys.workers, node), timeout_s=10)
    raw = client.redis.hget(keys.workers, node)
    assert raw is not None and len(raw) < 512
    entry = json.loads(raw)
    assert "queues" not in entry
    listed = json.loads(client.redis.hget(keys.worker_queues, node) or "[]")
    assert entry["queues_digest"] == queues_digest(listed)
    assert entry["queue_count"] == len(listed)
    live = client.health_reader.roster.live(heartbeat_s=client.settings.worker_heartbeat_s)
    assert live[node] == listed
    assert {spec.queue for spec in client.plugins()} <= set(listed)
