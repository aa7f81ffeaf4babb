"""Poison-proof delivery: nothing a queue item carries kills or stalls a worker.

Each hostile item is pushed onto a plugin queue served by a real prefork worker, the way a
hostile producer with access to the broker would (`LPUSH plugins.<id> ...`). The worker's
main process must be the same afterwards, a normal job must complete, each item must be
in the dead-letter store with its reason, and nothing may be left unacknowledged.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from pluginpool.policy.errors import InvalidPayloadError, PluginExecutionError
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.deadletter import DeadLetterStore
from tests.conftest import TEST_PLUGINS, make_settings, spawn_worker, worker_env


def envelope(body: object, *, headers: dict[str, object] | None = None,
             body_encoding: str = "base64", tag: str | None = None) -> tuple[str, str]:
    """A kombu message as kombu's Redis transport stores it, and its delivery tag."""
    tag = tag or uuid.uuid4().hex
    text = body if isinstance(body, str) else json.dumps(body)
    message = {
        "body": base64.b64encode(text.encode()).decode() if body_encoding == "base64" else text,
        "content-type": "application/json", "content-encoding": "utf-8",
        "headers": {"task": "plugin.echo", "id": uuid.uuid4().hex, **(headers or {})},
        "properties": {"delivery_tag": tag, "body_encoding": body_encoding,
                       "delivery_info": {"exchange": "", "routing_key": "plugins.echo"}},
    }
    return json.dumps(message), tag


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


HOSTILE: dict[str, tuple[str, str]] = {
    # name: (raw item, a word the dead-letter reason must contain)
    "undecodable type marker": ('{"__type__":"decimal","__value__":"abc"}', "decode"),
    "undecodable header marker": (
        envelope([[], {}, {}], headers={"x": {"__type__": "uuid", "__value__": 1}})[0],
        "decode"),
    "JSON 100,000 deep": (nested(100_000), "nested"),
    "body is not the task triple": (envelope([1])[0], "task call"),
    "body nested 100,000 deep": (envelope(nested(100_000))[0], "nested"),
    "body_encoding rot13": (envelope("[[], {}, {}]", body_encoding="rot13")[0], "rot13"),
    "timelimit that is not two numbers": (
        envelope([[], {}, {}], headers={"timelimit": "soon"})[0], "timelimit"),
    "not JSON": ("this is not a kombu message {", "not JSON"),
    "a JSON list": ("[1, 2, 3]", "not an object"),
    "not UTF-8": ("\udcff", "UTF-8"),
}


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[PluginClient, ManagedProcess]]:
    settings = make_settings(redis_url, key_prefix=f"pppoison:{uuid.uuid4().hex[:8]}:",
                             default_isolation={"sandboxed": False})
    client = PluginClient(settings)
    client.register(TEST_PLUGINS / "test_plugins.toml")
    worker = spawn_worker(client, tmp_path_factory.mktemp("poison"), plugins="echo",
                          concurrency=1)
    yield client, worker
    worker.stop()
    client.close()


def test_hostile_items_are_dead_lettered_and_the_worker_lives_on(
        served: tuple[PluginClient, ManagedProcess]) -> None:
    client, worker = served
    store = DeadLetterStore(client.redis, client.settings.keys)
    pid = worker.pid
    # kombu's unacked hash is shared by every test of the run: only what this test adds
    # counts.
    before = set(client.redis.hkeys("unacked"))
    for raw, _ in HOSTILE.values():
        client.redis.lpush("plugins.echo", raw.encode("utf-8", "surrogateescape"))
    assert client.submit("echo", "still here").result(timeout=30)["payload"] == "still here"
    assert worker.alive() and worker.pid == pid
    assert wait_until(lambda: store.count() >= len(HOSTILE), timeout_s=10)
    reasons = [entry.reason for entry in store.list(limit=100)]
    for name, (_, word) in HOSTILE.items():
        assert any(word in reason for reason in reasons), (name, reasons)
    assert wait_until(lambda: set(client.redis.hkeys("unacked")) <= before, timeout_s=10), \
        "nothing may be left to come back later"
    assert client.redis.llen("plugins.echo") == 0
    assert "Unrecoverable error" not in worker.log_text()


def test_a_payload_too_deep_for_the_pool_is_refused_wherever_it_comes_from(
        served: tuple[PluginClient, ManagedProcess]) -> None:
    """900 deep once killed the worker's main process while pickling it for the pool."""
    client, worker = served
    payload: object = "leaf"
    for _ in range(900):
        payload = [payload]
    with pytest.raises(InvalidPayloadError):
        client.submit("echo", payload)
    plain = Celery("hostile", broker=client.settings.redis_url, set_as_current=False)
    plain.conf.update(task_serializer="json", accept_content=["json"])
    sent = plain.send_task("plugin.echo", args=[payload], queue="plugins.echo")
    store = DeadLetterStore(client.redis, client.settings.keys)
    assert wait_until(lambda: any(e.id for e in store.list() if sent.id in e.raw),
                      timeout_s=20)
    assert client.submit("echo", "after").result(timeout=30)["payload"] == "after"
    assert worker.alive()
    plain.close()


def test_dead_letters_can_be_requeued_and_discarded(
        served: tuple[PluginClient, ManagedProcess], tmp_path: Path) -> None:
    """A requeued dead letter runs; the CLI lists, requeues and discards."""
    client, _ = served
    store = DeadLetterStore(client.redis, client.settings.keys)
    store.discard_all()
    plain = Celery("requeue", broker=client.settings.redis_url,
                   backend=client.settings.redis_url, set_as_current=False)
    plain.conf.update(task_serializer="json", accept_content=["json"],
                      result_accept_content=["json"])
    holding = f"pp-holding-{uuid.uuid4().hex[:6]}"
    result = plain.send_task("plugin.echo", args=["requeued"], queue=holding)
    raw = client.redis.rpop(holding)
    assert raw is not None
    # Set a real job aside as if the poison rule had quarantined it.
    message = json.loads(raw)
    entry = {"id": message["properties"]["delivery_tag"], "queue": "plugins.echo",
             "reason": "test", "raw": raw, "requeueable": True,
             "first_seen": 1.0, "at": 1.0, "deliveries": 3}
    client.redis.hset(client.settings.keys.dead_letter, entry["id"], json.dumps(entry))
    client.redis.zadd(client.settings.keys.dead_letter_index, {entry["id"]: 1.0})
    listed = _cli(client, "deadletter", "--json")
    assert json.loads(listed)["total"] == 1
    _cli(client, "deadletter", "--requeue", entry["id"])
    assert result.get(timeout=30)["value"]["payload"] == "requeued"
    assert store.count() == 0
    client.redis.lpush("plugins.echo", "junk")
    assert wait_until(lambda: store.count() == 1, timeout_s=10)
    _cli(client, "deadletter", "--discard", "--all")
    assert store.count() == 0
    plain.close()


def test_a_quarantined_job_whose_quarantining_worker_died_gets_its_outcome_from_a_sweep(
        served: tuple[PluginClient, ManagedProcess]) -> None:
    """claim.lua marks a quarantined message's outcome as pending in the same step; the
    worker that quarantined it stores the job's failure and clears the mark. If it died in
    between (or Redis failed the write), any worker's restore sweep stores it."""
    client, _worker = served
    job_id = str(uuid.uuid4())
    raw, tag = envelope([[], {"payload": "x"}, {}], headers={"id": job_id})
    entry = {"id": tag, "queue": "plugins.echo", "reason": "quarantined by the poison rule",
             "raw": raw, "requeueable": True, "first_seen": 1.0, "at": 1.0, "deliveries": 3}
    keys = client.settings.keys
    client.redis.hset(keys.dead_letter, tag, json.dumps(entry))
    client.redis.zadd(keys.dead_letter_index, {tag: 1.0})
    client.redis.sadd(keys.quarantine_pending, tag)  # and then its worker died
    with pytest.raises(PluginExecutionError) as failed:
        client.job(job_id, plugin_id="echo").result(timeout=30)
    assert failed.value.details["quarantined"] is True
    assert failed.value.details["dead_letter_id"] == tag
    assert wait_until(lambda: not client.redis.sismember(keys.quarantine_pending, tag),
                      timeout_s=10)
    DeadLetterStore(client.redis, keys).discard(tag)
    # A job an earlier delivery completed before its worker died keeps that outcome.
    done_id = str(uuid.uuid4())
    client.app.backend.mark_as_done(done_id, "ran once")
    raw, done_tag = envelope([[], {"payload": "x"}, {}], headers={"id": done_id})
    client.redis.hset(keys.dead_letter, done_tag, json.dumps({**entry, "id": done_tag,
                                                              "raw": raw}))
    client.redis.zadd(keys.dead_letter_index, {done_tag: 1.0})
    client.redis.sadd(keys.quarantine_pending, done_tag)
    assert wait_until(lambda: not client.redis.sismember(keys.quarantine_pending, done_tag),
                      timeout_s=10)
    assert client.app.AsyncResult(done_id).get(timeout=5) == "ran once"
    DeadLetterStore(client.redis, keys).discard(done_tag)


def _cli(client: PluginClient, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pluginpool.pool.tools.cli", *args],
                          env=worker_env(client.settings), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_message_that_kills_its_worker_is_quarantined_after_bounded_deliveries(
        redis_url: str, tmp_path: Path) -> None:
    """The crash loop: a job whose run SIGKILLs the worker's main process comes back (its
    consumer's heartbeat stops, the next worker returns it) and kills each restarted
    worker, until the poison rule quarantines it at its (max_deliveries + 1)th claim; its
    producer gets a failure naming the dead letter, and the queue's other jobs all
    complete."""
    settings = make_settings(redis_url, key_prefix=f"ppcrash:{uuid.uuid4().hex[:8]}:",
                             restore_sweep_s=0.5, consumer_dead_after_s=2, max_deliveries=2)
    client = PluginClient(settings)
    client.register(TEST_PLUGINS / "poison_plugins.toml")
    store = DeadLetterStore(client.redis, settings.keys)
    killer = client.submit("kills-worker", "kill")
    others = [client.submit("kills-worker", i) for i in range(5)]
    deaths = 0
    workers: list[ManagedProcess] = []
    try:
        while store.count() == 0 and deaths < 5:
            # Started without waiting for a ping: it may die before it could answer.
            worker = ManagedProcess(
                [sys.executable, "-m", "pluginpool.pool.tools.cli", "worker", "--plugins",
                 "kills-worker", "--concurrency", "1", "--name", f"crash{deaths}@localhost"],
                env=worker_env(settings), log_path=tmp_path / f"crash{deaths}.log")
            workers.append(worker)
            wait_until(lambda w=worker: not w.alive() or store.count() > 0, timeout_s=60)
            if worker.alive():
                break
            deaths += 1
        assert store.count() == 1, f"not quarantined after {deaths} deaths"
        assert deaths == 2
        entry = store.list()[0]
        assert killer.id in entry.raw and entry.deliveries == 2
        assert "poison rule" in entry.reason
        with pytest.raises(PluginExecutionError) as failed:  # its producer gets an outcome
            killer.result(timeout=30)
        assert failed.value.details["quarantined"] is True
        assert failed.value.details["dead_letter_id"] == entry.id
        assert not client.redis.sismember(settings.keys.quarantine_pending, entry.id)
        assert [job.result(timeout=40) for job in others] == list(range(5))
        assert workers[-1].alive()
    finally:
        for worker in workers:
            worker.stop()
        client.close()
