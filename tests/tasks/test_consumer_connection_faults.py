"""The consuming connection fails under a worker: it recovers, with no message lost or doubled.

- **Half-open**: the peer vanishes without a FIN or RST (a failover, a load balancer or NAT
  entry expiring). A small TCP proxy in the test stops forwarding but keeps both sockets
  open. The consumer must notice (kombu's `health_check_interval` check, which reliable
  fetch feeds) and go on from a fresh connection.
- **Reconnect**: the consuming connection is re-established under the event loop (as
  redis-py does while retrying) on a Redis that has lost its script cache (a restart).

Real Redis, real sockets; short socket and health-check timeouts keep each test to seconds.
The half-open proxy is written here (some 40 lines of sockets and threads) because it must
black-hole an established connection while forwarding new ones, which no test library on
PyPI we know of does for raw TCP.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kombu
import pytest
import redis
from kombu.asynchronous.hub import Hub

from pluginpool.pool.tools.redis_bootstrap import start_local_redis
from pluginpool.tasks.transport import TRANSPORT_PATH

HEALTH_CHECK_S = 1
IDLE_WAIT_S = 2.0
DEADLINE_S = 30


class FreezableProxy:
    """TCP proxy whose established connections can be made half-open: `freeze()` keeps
    them open but drops every byte both ways. Connections accepted later are forwarded."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.accepted = 0
        self._pairs: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            frozen = threading.Event()
            self._pairs.append((client, server, frozen))
            self.accepted += 1
            threading.Thread(target=self._pump, args=(client, server, frozen),
                             daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket,
              frozen: threading.Event) -> None:
        peers = {client: server, server: client}
        while not self._closed.is_set():
            try:
                readable, _, _ = select.select(list(peers), [], [], 0.1)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if not frozen.is_set():
                        peers[sock].sendall(data)
            except OSError:
                return

    def freeze(self) -> None:
        for _, _, frozen in self._pairs:
            frozen.set()

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        for client, server, _ in self._pairs:
            client.close()
            server.close()


@pytest.fixture
def proxy(redis_url: str) -> Iterator[FreezableProxy]:
    parsed = urlparse(redis_url)
    running = FreezableProxy((parsed.hostname or "127.0.0.1", parsed.port or 6379))
    yield running
    running.close()


def consumer_options(name: str) -> dict[str, Any]:
    """Keys of the test's own; short timeouts so a dead connection is seen in seconds."""
    return {"socket_timeout": 1, "socket_connect_timeout": 1,
            "health_check_interval": HEALTH_CHECK_S, "pluginpool_idle_wait_s": IDLE_WAIT_S,
            "visibility_timeout": 3600, "unacked_key": f"{name}:unacked",
            "unacked_index_key": f"{name}:unacked_index",
            "unacked_mutex_key": f"{name}:unacked_mutex",
            "pluginpool_bell_prefix": f"{name}:bell:"}


def publish(url: str, name: str, bodies: range) -> None:
    with kombu.Connection(url, transport=TRANSPORT_PATH,
                          transport_options=consumer_options(name)) as conn:
        producer = kombu.Producer(conn)
        for body in bodies:
            producer.publish(body, routing_key=name, serializer="json")


def drain_until(conn: kombu.Connection, done: Callable[[], bool], *,
                timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        with contextlib.suppress(socket.timeout):
            conn.drain_events(timeout=0.5)


def proxied(redis_url: str, proxy: FreezableProxy) -> str:
    parsed = urlparse(redis_url)
    return parsed._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()


@pytest.mark.parametrize("no_ack", [False, True], ids=["acked", "no-ack"])
def test_half_open_consuming_connection_is_dropped_and_consumption_resumes(
        redis_url: str, proxy: FreezableProxy, no_ack: bool) -> None:
    """Frozen while waiting on the bell: the consumer drops the dead connection and gets
    every message published meanwhile from a fresh one, each exactly once, in order."""
    name = f"halfopen-{uuid.uuid4().hex[:8]}"
    store = redis.Redis.from_url(redis_url)
    queue = kombu.Queue(name, kombu.Exchange(name), routing_key=name)
    received: list[int] = []

    def on_message(body: int, message: kombu.Message) -> None:
        received.append(body)
        if not no_ack:
            message.ack()

    # Acks go over kombu's connection pool, whose connections went half-open too: with
    # `retry_on_timeout` redis-py retries an ack (idempotent) on a fresh connection.
    # Without it the first ack fails after socket_timeout and that message comes back
    # after the visibility timeout, as with kombu's own transport (see README).
    options = {**consumer_options(name), "retry_on_timeout": not no_ack}
    with kombu.Connection(proxied(redis_url, proxy), transport=TRANSPORT_PATH,
                          transport_options=options) as conn, \
            kombu.Consumer(conn, [queue], callbacks=[on_message], accept=["json"],
                           no_ack=no_ack) as consumer:
        publish(redis_url, name, range(1))
        drain_until(conn, lambda: received == [0])
        assert received == [0]
        with contextlib.suppress(socket.timeout):
            conn.drain_events(timeout=0.3)  # now idle: waiting on the bell
        channel: Any = consumer.channel
        assert channel._in_poll and not channel._claim_in_flight
        dead = channel.client.connection._sock
        proxy.freeze()
        publish(redis_url, name, range(1, 6))

        drain_until(conn, lambda: len(received) >= 6)
        assert received == list(range(6))
        assert channel.client.connection._sock is not dead
        with contextlib.suppress(socket.timeout):
            conn.drain_events(timeout=1)
    assert received == list(range(6)), "a message came twice"
    assert store.llen(name) == 0
    assert store.hlen(f"{name}:unacked") == 0, "records left behind would be redelivered"
    store.close()


def test_half_open_connection_is_dropped_under_the_event_loop(
        redis_url: str, proxy: FreezableProxy) -> None:
    """The same fault under kombu's event loop (as a Celery worker runs): the periodic
    health check drops the connection and the next tick consumes from a fresh one."""
    name = f"halfopen-hub-{uuid.uuid4().hex[:8]}"
    queue = kombu.Queue(name, kombu.Exchange(name), routing_key=name)
    received: list[int] = []

    def on_message(body: int, message: kombu.Message) -> None:
        received.append(body)
        message.ack()

    hub = Hub()
    try:
        options = {**consumer_options(name), "retry_on_timeout": True}  # acks: see above
        with kombu.Connection(proxied(redis_url, proxy), transport=TRANSPORT_PATH,
                              transport_options=options) as conn, \
                kombu.Consumer(conn, [queue], callbacks=[on_message], accept=["json"]):
            conn.register_with_event_loop(hub)

            def run_until(done: Callable[[], bool]) -> None:
                deadline = time.monotonic() + DEADLINE_S
                while not done() and time.monotonic() < deadline:
                    hub.run_once()

            publish(redis_url, name, range(1))
            run_until(lambda: received == [0])
            idle_until = time.monotonic() + 0.3
            run_until(lambda: time.monotonic() > idle_until)
            proxy.freeze()
            accepted = proxy.accepted
            publish(redis_url, name, range(1, 4))
            run_until(lambda: len(received) >= 4)
            assert received == [0, 1, 2, 3]
            assert proxy.accepted > accepted, "consumed again over a fresh connection"
    finally:
        hub.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own: its script cache is flushed, which must not
    touch anyone else's scripts. Stopped by PID."""
    started = start_local_redis(tmp_path)
    yield started.url
    if started.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(started.pid, signal.SIGTERM)


def test_event_loop_consumes_after_reconnect_on_a_redis_without_our_script(
        private_redis: str) -> None:
    """The consuming connection is re-established before each poll (as redis-py does while
    retrying) on a Redis whose script cache was flushed (as after a restart): every
    message is consumed at the first readable reply, exactly once."""
    name = f"reconnect-{uuid.uuid4().hex[:8]}"
    store = redis.Redis.from_url(private_redis)
    queue = kombu.Queue(name, kombu.Exchange(name), routing_key=name)
    received: list[int] = []

    def on_message(body: int, message: kombu.Message) -> None:
        received.append(body)
        message.ack()

    hub = Hub()
    try:
        with kombu.Connection(private_redis, transport=TRANSPORT_PATH,
                              transport_options=consumer_options(name)) as conn, \
                kombu.Consumer(conn, [queue], callbacks=[on_message],
                               accept=["json"]) as consumer:
            conn.register_with_event_loop(hub)
            for tick in hub.on_tick:
                tick()
            consuming = consumer.channel.client.connection
            for sequence in range(3):
                store.script_flush()
                consuming.disconnect()
                consuming.connect()
                publish(private_redis, name, range(sequence, sequence + 1))
                deadline = time.monotonic() + 10
                while len(received) <= sequence and time.monotonic() < deadline:
                    for tick in hub.on_tick:
                        tick()
                    # Call the readers directly, as kombu's own test does: a reply that
                    # only says "try again" (queue.Empty) would fail here.
                    for fd, _ in hub.poller.poll(0.1):
                        callback, args = hub.readers[fd]
                        callback(*args)
                assert received == list(range(sequence + 1))
    finally:
        hub.close()
    assert store.hlen(f"{name}:unacked") == 0
    store.close()


def test_live_consumer_waiting_longer_than_brpop_timeout_is_not_dropped(
        redis_url: str, proxy: FreezableProxy, caplog: pytest.LogCaptureFixture) -> None:
    """An idle wait on the bells longer than kombu's `brpop_timeout` plus the health-check
    interval is a live wait: the half-open check must not drop it (nor reconnect)."""
    name = f"livewait-{uuid.uuid4().hex[:8]}"
    queue = kombu.Queue(name, kombu.Exchange(name), routing_key=name)
    received: list[int] = []
    options = {**consumer_options(name), "polling_interval": 0.5,
               "pluginpool_idle_wait_s": 3.0}
    with kombu.Connection(proxied(redis_url, proxy), transport=TRANSPORT_PATH,
                          transport_options=options) as conn, \
            kombu.Consumer(conn, [queue], callbacks=[lambda body, _: received.append(body)],
                           accept=["json"], no_ack=True):
        with contextlib.suppress(socket.timeout):
            conn.drain_events(timeout=0.3)
        accepted = proxy.accepted
        idle_until = time.monotonic() + 5
        drain_until(conn, lambda: time.monotonic() > idle_until, timeout_s=6)
        publish(redis_url, name, range(1))
        drain_until(conn, lambda: received == [0])
        assert received == [0]
        assert proxy.accepted == accepted, "a live connection was dropped and reopened"
    assert "dropping stale connection" not in caplog.text
