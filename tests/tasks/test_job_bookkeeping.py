"""Issue 16: a job's bookkeeping rides on round trips that happen anyway.

- a submit's pause check and `queued` status travel in its publish (publish.lua): the
  producer's own Redis client is not used at all, a paused plugin's job is not pushed;
- the worker's pre-run check (cancelled? disabled?) writes `started` in the same step;
- the final status, the outcome record and the run log go in the MULTI that stores Celery's
  result, so a watcher that sees the status can read the result.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.app.task import Context
from celery.exceptions import Reject
from kombu.transport.redis import Channel

from pluginpool.policy.errors import (
    ErrorType,
    JobCancelledError,
    PluginDisabledError,
    PluginExecutionError,
)
from pluginpool.pool.job_start import start_job
from pluginpool.pool.tools.processes import wait_until
from pluginpool.tasks import ready_index
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.job_status import JobStatusStore
from pluginpool.tasks.pause import Pause
from pluginpool.tasks.result_store import JobResultBackend, bind_result_store, final_status
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec
from pluginpool.tasks.submit_step import SUBMIT_HEADER, SubmitStep
from tests.events import Events

SPEC = PluginSpec.model_validate({"id": "books", "name": "books",
                                  "entrypoint": "pluginpool_examples.text:noop",
                                  "isolation": {"sandboxed": False}})


@pytest.fixture
def store(client: PluginClient) -> Iterator[redis.Redis]:
    raw = redis.Redis.from_url(client.settings.redis_url, decode_responses=True)
    yield raw
    raw.close()


def pause(client: PluginClient, mode: str) -> None:
    client.redis.hset(client.settings.keys.paused, SPEC.id,
                      Pause(mode=mode, by="test", at=0.0).model_dump_json())  # type: ignore[arg-type]


def history(client: PluginClient, job_id: str) -> list[str]:
    return [c["status"] for c in JobStatusStore(client.redis, client.settings.keys,
                                                ttl_s=60).history(job_id)]


def test_a_submit_uses_no_round_trip_of_the_producers_own(
        client: PluginClient, store: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    client.register(SPEC)
    client.submit(SPEC.id, 0)  # warm: spec and breaker cached
    calls: list[Any] = []
    real = client.redis.execute_command
    monkeypatch.setattr(client.redis, "execute_command",
                        lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    job = client.submit(SPEC.id, 1)
    assert calls == []  # no HGET of the pause, no status script: both are in the publish
    changes = JobStatusStore(client.redis, client.settings.keys, ttl_s=60).history(job.id)
    assert [(c["status"], c["seq"], c["plugin_id"]) for c in changes] == [
        ("queued", 1, SPEC.id)]
    queued = [json.loads(raw) for raw in store.lrange(SPEC.queue, 0, -1)]
    assert queued[0]["headers"]["id"] == job.id  # newest first (LPUSH)
    assert all(SUBMIT_HEADER not in m["headers"] for m in queued)  # never on the wire


@pytest.mark.parametrize("mode", ["disabled", "draining"])
def test_a_paused_plugins_job_is_refused_by_the_publish_and_not_pushed(
        client: PluginClient, store: redis.Redis, mode: str) -> None:
    client.register(SPEC)
    client.submit(SPEC.id, 0)
    pause(client, mode)
    before = store.llen(SPEC.queue)
    with pytest.raises(PluginDisabledError, match=mode):
        client.submit(SPEC.id, 1)
    assert store.llen(SPEC.queue) == before
    assert len(store.keys(client.settings.keys.job_status("*"))) == 1  # the first job's


def test_the_pre_run_check_writes_started_or_refuses(client: PluginClient,
                                                     settings: Settings) -> None:
    keys, ttl = settings.keys, 60
    start_job(client.redis, keys, plugin_id=SPEC.id, job_id="j1", worker="w@h", attempt=1,
              ttl_s=ttl)
    [started] = JobStatusStore(client.redis, keys, ttl_s=ttl).history("j1")
    assert (started["status"], started["worker"], started["attempt"]) == ("started", "w@h", 1)
    client.redis.set(keys.cancelled("j2"), json.dumps({"job_id": "j2", "reason": "test"}))
    with pytest.raises(JobCancelledError):
        start_job(client.redis, keys, plugin_id=SPEC.id, job_id="j2", worker="w", attempt=1,
                  ttl_s=ttl)
    pause(client, "draining")  # draining refuses submits, not runs
    start_job(client.redis, keys, plugin_id=SPEC.id, job_id="j3", worker="w", attempt=1,
              ttl_s=ttl)
    pause(client, "disabled")
    with pytest.raises(Reject):
        start_job(client.redis, keys, plugin_id=SPEC.id, job_id="j4", worker="w",
                  attempt=1, ttl_s=ttl)
    assert (history(client, "j2"), history(client, "j3"), history(client, "j4")) == (
        [], ["started"], [])


def test_the_final_status_and_the_bookkeeping_are_stored_with_the_result(
        client: PluginClient, settings: Settings, store: redis.Redis) -> None:
    backend = client.app.backend
    assert isinstance(backend, JobResultBackend)
    assert bind_result_store(backend, settings.keys, ttl_s=60,
                             result_backend=settings.effective_result_backend,
                             redis_url=settings.redis_url)
    replies: list[Any] = []
    key = settings.keys.prefix + "books-test"
    backend.with_result("j5", lambda pipe: pipe.incr(key), replies.extend)
    backend.mark_as_done("j5", {"value": 1}, request=Context(id="j5", task="plugin.books"))
    assert client.job("j5").stored_outcome() == {"value": 1}
    assert history(client, "j5") == ["succeeded"] and replies == [1]
    error = PluginExecutionError.of(ErrorType.TIMEOUT, "slow", plugin_id="books")
    backend.mark_as_failure("j6", error, request=Context(id="j6", task="plugin.books"))
    [failed] = JobStatusStore(client.redis, settings.keys, ttl_s=60).history("j6")
    assert (failed["status"], failed["error_type"]) == ("failed", "timeout")
    backend.mark_as_done("j7", 1, request=Context(id="j7", task="not-a-plugin"))
    assert history(client, "j7") == [] and store.get(key) == "1"


def bound_backend(client: PluginClient, settings: Settings) -> JobResultBackend:
    backend = client.app.backend
    assert isinstance(backend, JobResultBackend)
    assert bind_result_store(backend, settings.keys, ttl_s=60,
                             result_backend=settings.effective_result_backend,
                             redis_url=settings.redis_url)
    return backend


@pytest.mark.parametrize("stored_by", ["celery", "another writer"])
def test_a_stored_success_is_never_overwritten_and_is_not_read_first(
        client: PluginClient, settings: Settings, store: redis.Redis,
        monkeypatch: pytest.MonkeyPatch, stored_by: str) -> None:
    """A run of a job redelivered after its success was stored (before its ack) fails:
    the success stays, the status stays `succeeded`, the run is still recorded. No GET
    of the stored state precedes the store (the store script checks it)."""
    backend = bound_backend(client, settings)

    def no_read(task_id: str) -> None:
        raise AssertionError(f"the stored state of {task_id} was read before the store")

    monkeypatch.setattr(backend, "_get_task_meta_for", no_read)
    job = f"j-again-{stored_by[0]}"
    request = Context(id=job, task="plugin.books")
    if stored_by == "celery":
        backend.mark_as_done(job, {"value": 1}, request=request)
    else:  # `status` not first: the script decodes it
        store.set(backend.get_key_for_task(job), json.dumps(
            {"result": {"value": 1}, "task_id": job, "status": "SUCCESS"}))
    replies: list[Any] = []
    key = settings.keys.prefix + f"books-again-{stored_by[0]}"
    backend.with_result(job, lambda pipe: pipe.incr(key), replies.extend)
    backend.mark_as_failure(job, PluginExecutionError.of(ErrorType.RUNTIME, "again",
                                                         plugin_id="books"), request=request)
    monkeypatch.undo()  # the checks below read it
    assert client.job(job).stored_outcome() == {"value": 1}
    assert history(client, job) == (["succeeded"] if stored_by == "celery" else [])
    assert replies == [1] and store.get(key) == "1"


def test_the_store_script_is_loaded_again_when_redis_lost_it(
        client: PluginClient, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    import pluginpool.tasks.result_store as result_store
    backend = bound_backend(client, settings)
    monkeypatch.setattr(result_store, "STORE_SHA", "0" * 40)  # as after a Redis restart
    backend.mark_as_done("j-noscript", {"value": 2},
                         request=Context(id="j-noscript", task="plugin.books"))
    assert client.job("j-noscript").stored_outcome() == {"value": 2}
    assert history(client, "j-noscript") == ["succeeded"]


def test_final_statuses_by_stored_state() -> None:
    assert final_status("SUCCESS", 1) == ("succeeded", {})
    assert final_status("STARTED", None) is None and final_status("RETRY", None) is None
    assert final_status("FAILURE", JobCancelledError.of("x", plugin_id=None)) == ("cancelled", {})
    assert final_status("FAILURE", ValueError())[1] == {"error_type": None,
                                                        "error": "ValueError"}


def test_a_jobs_task_sent_event_rides_on_its_publish_with_celerys_fields(
        client: PluginClient, store: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    client.register(SPEC)
    client.submit(SPEC.id, 0)  # warm
    events = Events(client)
    try:
        assert events.listening()
        fanout: list[str] = []
        real = Channel._put_fanout
        monkeypatch.setattr(Channel, "_put_fanout", lambda self, exchange, message, key, **kw: (
            fanout.append(key), real(self, exchange, message, key, **kw))[1])
        job = client.submit(SPEC.id, {"title": "Dune"})
        assert wait_until(lambda: events.of("task-sent", {job.id}) == {job.id}, timeout_s=10)
        assert "task.sent" not in fanout  # not a PUBLISH of its own: publish.lua sent it
        [sent] = [e for e in events.seen if e.get("type") == "task-sent"
                  and e.get("uuid") == job.id]
        assert (sent["name"], sent["queue"], sent["routing_key"], sent["exchange"]) == (
            SPEC.task_name, SPEC.queue, SPEC.queue, "")
        assert "Dune" in sent["kwargs"] and sent["args"] == "()"  # Celery's own reprs
        assert sent["retries"] == 0 and sent["root_id"] == job.id
        assert sent["hostname"] and isinstance(sent["clock"], int) and sent["timestamp"]

        # A refused job sends none; the next accepted one does.
        pause(client, "disabled")
        with pytest.raises(PluginDisabledError):
            client.submit(SPEC.id, {"title": "refused"})
        store.hdel(client.settings.keys.paused, SPEC.id)
        later = client.submit(SPEC.id, {"title": "after"})
        assert wait_until(lambda: events.of("task-sent", {later.id}) == {later.id}, timeout_s=10)
        assert not [e for e in events.seen if e.get("type") == "task-sent"
                    and "refused" in str(e.get("kwargs"))]
    finally:
        events.close()


@pytest.mark.parametrize("stored", ["not json {", "[1, 2]", None])
def test_a_damaged_status_history_does_not_fail_the_store_after_its_write(
        client: PluginClient, settings: Settings, store: redis.Redis,
        stored: str | None) -> None:
    """Redis keeps a script's writes when it fails later: the status write that follows
    the result's SET must not raise on a change it cannot read (damaged, or missing from a
    hash whose length says it is there)."""
    backend = bound_backend(client, settings)
    job_id = f"damaged-{uuid.uuid4().hex}"  # results are not under the test's prefix
    status_key = settings.keys.job_status(job_id)
    store.hset(status_key, "2" if stored is None else "1", stored or "{}")
    backend.mark_as_done(job_id, {"value": 9},
                         request=Context(id=job_id, task="plugin.books"))
    assert client.job(job_id).stored_outcome() == {"value": 9}
    # One change was there (HLEN 1): the final status is the second.
    assert json.loads(store.hget(status_key, "2"))["status"] == "succeeded"


def test_a_publish_retried_after_a_lost_reply_sends_task_sent_once(
        client: PluginClient, store: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """kombu retries a publish whose reply was lost: the job is pushed again (as with
    Celery's own sender), its `task-sent` goes once, with its single `queued`."""
    client.register(SPEC)
    client.submit(SPEC.id, 0)  # warm
    events = Events(client)
    try:
        assert events.listening()
        real = ready_index.run_script
        lost = {"once": True}

        def reply_lost(redis_client: Any, script: Any, keys: Any, args: Any) -> Any:
            reply = real(redis_client, script, keys, args)
            if lost["once"] and len(keys) > 2:  # a plugin job's publish
                lost["once"] = False
                raise redis.ConnectionError("the reply was lost")
            return reply

        monkeypatch.setattr(ready_index, "run_script", reply_lost)
        before = store.llen(SPEC.queue)
        job = client.submit(SPEC.id, {"title": "twice pushed"})
        assert not lost["once"] and store.llen(SPEC.queue) == before + 2
        time.sleep(1.0)  # anything sent has arrived by now
        assert [e["uuid"] for e in events.seen if e.get("type") == "task-sent"
                and e.get("uuid") == job.id] == [job.id]
        assert history(client, job.id) == ["queued"]
    finally:
        events.close()


def test_the_events_channel_carries_kombus_key_prefix_and_pluginpools_keys_do_not() -> None:
    """kombu's `global_keyprefix` prefixes its fanout channels (PUBLISH and PSUBSCRIBE
    alike): the event the script publishes must go where receivers listen."""
    step = SubmitStep(plugin_id="p", paused_key="pp:paused", status_key="pp:job:j:status",
                      channel="pp:events:job:j", queued="{}", ttl_s=60,
                      sent_event=("/0.celeryev/task.sent", "message"))
    assert step.script_keys() == ["pp:paused", "pp:job:j:status", "pp:events:job:j"]
    assert step.script_args(broker_prefix="tenant:") == [
        "p", "{}", 60, "tenant:/0.celeryev/task.sent", "message"]
    assert dataclasses.replace(step, sent_event=None).script_args(
        broker_prefix="tenant:") == ["p", "{}", 60]


def test_a_plugin_jobs_publish_is_not_batched_so_its_refusal_reaches_the_caller(
        client: PluginClient, store: redis.Redis) -> None:
    """kombu's publish batches send many messages in one pipeline and read no reply per
    message: a paused plugin's job must still be refused, not silently dropped."""
    client.register(SPEC)
    pause(client, "disabled")
    step = SubmitStep.for_job(client.settings.keys, plugin_id=SPEC.id, job_id="batched",
                              instance_id=None, ttl_s=60)
    message = {"body": "e30=", "content-type": "application/json",
               "content-encoding": "utf-8", "headers": {SUBMIT_HEADER: step},
               "properties": {"delivery_tag": "t", "body_encoding": "base64",
                              "delivery_info": {"exchange": "", "routing_key": SPEC.queue},
                              "priority": 0}}
    before = store.llen(SPEC.queue)  # queue names are not under the test's prefix
    with client.app.connection_for_write() as connection:
        channel = connection.default_channel
        batch = channel.create_publish_batch(max_size=10)
        with pytest.raises(PluginDisabledError):
            channel._put(SPEC.queue, message, _publish_batch=batch)
        batch.flush()
    assert store.llen(SPEC.queue) == before
