"""An event encoded for a Lua script's PUBLISH reaches a Celery event receiver as if the
dispatcher had sent it, and the encoder itself sends nothing."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import signal
import sys
import threading
import time
from typing import Any

import redis
from celery import Celery

from pluginpool.tasks.event_encoder import EventEncoder, same_server


def test_same_server_ignores_the_database() -> None:
    assert same_server("redis://h:6379/0", "redis://h:6379/3")
    assert same_server("redis://h/0", "redis://:secret@h:6379/3")  # default port, password
    assert not same_server("redis://h:6379/0", "redis://other:6379/0")
    assert not same_server("redis://h:6379/0", "redis://h:6380/0")
    # Unix sockets: the path names the server (their netlocs are both empty).
    assert same_server("unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=2")
    assert not same_server("unix:///run/a.sock", "unix:///run/b.sock")
    # Sentinel URLs (several hosts, ';'-separated) compare as written; before, reading
    # their "port" raised, and every job failed after its run.
    sentinel = "sentinel://s1:26379;sentinel://s2:26379/0"
    assert same_server(sentinel, sentinel)
    assert not same_server(sentinel, "sentinel://s3:26379/0")
    assert not same_server("redis://h:notaport/0", "redis://h:6379/0")


def test_an_encoded_event_published_by_hand_is_received_as_a_celery_event(
        redis_url: str) -> None:
    app = Celery("enc", broker=redis_url, set_as_current=False)
    app.conf.update(event_serializer="json", accept_content=["json"])
    received: list[dict[str, Any]] = []
    ready = threading.Event()

    def consume() -> None:
        with app.connection_for_read() as conn:
            def handle(event: dict[str, Any]) -> None:
                received.append(event)
                receiver.should_stop = len(received) == 2

            receiver = app.events.Receiver(conn, handlers={"task-plugin-usage": handle})
            ready.set()
            receiver.capture(limit=None, timeout=10)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    ready.wait(5)
    encoder = EventEncoder()
    # The first through kombu's publish path, the second on the envelope kept from it.
    channel, message = encoder.encode(app, "w1@host", "task-plugin-usage", uuid="j1",
                                      plugin_id="p", usage={"cpu_ms": 1.5})
    channel2, message2 = encoder.encode(app, "w1@host", "task-plugin-usage", uuid="j2",
                                        plugin_id="p", usage={"cpu_ms": 2.5})
    assert channel2 == channel
    time.sleep(0.3)
    assert received == []  # encoding sent nothing
    publisher = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 10
    while not publisher.publish(channel, message) and time.monotonic() < deadline:
        time.sleep(0.1)  # until the receiver has subscribed
    publisher.publish(channel2, message2)
    thread.join(10)
    [event, event2] = received
    assert event["type"] == "task-plugin-usage" and event["hostname"] == "w1@host"
    assert event["plugin_id"] == "p" and event["usage"] == {"cpu_ms": 1.5}
    assert event["uuid"] == "j1" and "clock" in event and "timestamp" in event
    assert event2["uuid"] == "j2" and event2["usage"] == {"cpu_ms": 2.5}
    assert event2["clock"] > event["clock"] and event2["timestamp"] >= event["timestamp"]
    assert {k: v for k, v in event2.items() if k not in ("uuid", "usage", "clock",
                                                          "timestamp", "local_received")} \
        == {k: v for k, v in event.items() if k not in ("uuid", "usage", "clock", "timestamp",
                                                         "local_received")}


def test_a_kept_envelope_is_kombus_own_less_its_body_and_tag(redis_url: str) -> None:
    app = Celery("enc", broker=redis_url, set_as_current=False)
    app.conf.update(event_serializer="json", accept_content=["json"])
    encoder = EventEncoder()
    kombu_made = json.loads(encoder.encode(app, "w1@host", "task-x", uuid="a")[1])
    kept = json.loads(encoder.encode(app, "w1@host", "task-x", uuid="b")[1])
    fresh = json.loads(EventEncoder().encode(app, "w1@host", "task-x", uuid="b")[1])
    for message in (kombu_made, kept, fresh):
        message["properties"].pop("delivery_tag")
        body = json.loads(base64.b64decode(message.pop("body")))
        assert body["type"] == "task-x"
    assert kept == kombu_made == fresh
    assert list(kept) == list(kombu_made)  # the same keys in the same order: byte for byte
    # Another hostname or another type goes through kombu again.
    other = json.loads(encoder.encode(app, "w2@host", "task-x", uuid="c")[1])
    assert json.loads(base64.b64decode(other["body"]))["hostname"] == "w2@host"
    assert other["headers"] == {"hostname": "w2@host"}


def test_threads_sharing_an_encoder_each_get_their_own_event(redis_url: str) -> None:
    """A producer's client may be shared by threads: the first event of a type is captured
    from one channel, so two threads there at once once raised."""
    app = Celery("enc", broker=redis_url, set_as_current=False)
    app.conf.update(event_serializer="json", accept_content=["json"])
    bodies: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)
    encoder = EventEncoder()

    def send(n: int) -> None:
        start.wait()
        for i in range(50):
            if i % 10 == 0 and n == 0:
                encoder._envelopes.clear()  # back to kombu's path: the shared capture
            try:
                message = json.loads(encoder.encode(app, "w1@host", "task-x", uuid=f"{n}-{i}")[1])
                bodies.append(json.loads(base64.b64decode(message["body"])))
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave inside the capture, as under load
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert sorted(b["uuid"] for b in bodies) == sorted(f"{n}-{i}" for n in range(8)
                                                        for i in range(50))
    assert len({b["clock"] for b in bodies}) == 400


def test_a_forked_child_encodes_even_while_the_parent_held_the_lock(redis_url: str) -> None:
    """A producer that forks (a prefork pool, a multiprocessing server) while another of its
    threads is inside `encode`: the child's copy of the lock would stay held forever."""
    app = Celery("enc", broker=redis_url, set_as_current=False)
    app.conf.update(event_serializer="json", accept_content=["json"])
    encoder = EventEncoder()
    encoder.encode(app, "w1@host", "task-x", uuid="parent")
    read_end, write_end = os.pipe()
    with encoder._lock:  # as if another thread were encoding at the fork
        pid = os.fork()
        if pid == 0:
            try:
                _, message = encoder.encode(app, "w1@host", "task-x", uuid="child")
                body = json.loads(base64.b64decode(json.loads(message)["body"]))
                os.write(write_end, json.dumps([body["uuid"], body["pid"]]).encode())
            finally:
                os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 20)
        assert ready, "the child hung on the lock it copied"
        assert json.loads(os.read(read_end, 4096)) == ["child", pid]
    finally:
        os.close(read_end)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # a hung child is stopped by its pid
        os.waitpid(pid, 0)


def test_a_connection_that_cannot_be_made_fails_fast_for_a_while() -> None:
    """Before, every thread waited a whole connect timeout in turn, holding the lock."""
    from pluginpool.tasks.event_encoder import EncoderUnavailable
    app = Celery("enc", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.update(event_serializer="json", accept_content=["json"],
                    broker_connection_timeout=1, broker_connection_retry=False,
                    broker_connection_max_retries=0)
    encoder = EventEncoder()
    started = time.monotonic()
    with contextlib.suppress(Exception):
        encoder.encode(app, "w1@host", "task-x", uuid="a")
    first = time.monotonic() - started
    started = time.monotonic()
    for _ in range(5):
        try:
            encoder.encode(app, "w1@host", "task-x", uuid="b")
        except EncoderUnavailable:
            continue
        raise AssertionError("it tried to connect again at once")
    assert time.monotonic() - started < max(first, 0.5)


def test_the_brokers_key_prefix_is_known_for_a_scripts_publish(redis_url: str) -> None:
    """kombu prefixes the channels it publishes on with `global_keyprefix` (its receivers
    subscribe there): a usage event published by a script went to the bare channel."""
    app = Celery("enc", broker=redis_url, set_as_current=False)
    app.conf.update(event_serializer="json", accept_content=["json"],
                    broker_transport_options={"global_keyprefix": "pfx:"})
    encoder = EventEncoder()
    channel, _ = encoder.encode(app, "w1@host", "task-x", uuid="a")
    assert encoder.broker_prefix == "pfx:" and not channel.startswith("pfx:")
    plain = Celery("enc", broker=redis_url, set_as_current=False)
    other = EventEncoder()
    other.encode(plain, "w1@host", "task-x", uuid="a")
    assert other.broker_prefix == ""


def test_encoders_share_one_fork_hook_and_are_freed() -> None:
    """Before, each encoder (one per client that submits) registered a fork hook of its own:
    they were never freed, and every fork ran all of them."""
    import gc

    from pluginpool.tasks import event_encoder

    gc.collect()
    before = len(event_encoder._ENCODERS)
    encoders = [EventEncoder() for _ in range(50)]
    assert len(event_encoder._ENCODERS) == before + 50
    del encoders
    gc.collect()
    assert len(event_encoder._ENCODERS) == before
