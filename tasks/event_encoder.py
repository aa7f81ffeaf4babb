"""Celery events encoded exactly as the broker transport would publish them, so a Lua
script that runs anyway (the outcome record) can PUBLISH one in the same round trip.

Over Redis an event is one PUBLISH of kombu's JSON envelope on the events exchange's
channel. The encoder owns a dispatcher on a connection of its own whose channel keeps
what it would publish instead of sending it; receivers (the aggregator, Flower) cannot
tell the difference. Only for a broker on the same Redis server as pluginpool's own
(`same_server`); otherwise events are sent the usual way.

kombu's whole publish path costs about 90 us an event, once a job in every pool process.
So the first event of each type goes through it, and its envelope is kept: later events
of that type reuse the envelope (exchange, routing key, headers, encodings exactly as
kombu made them) with their own body, encoded as kombu does (its JSON, then base64), and
a fresh delivery tag: about a quarter of the cost.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import weakref
from base64 import b64encode
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from kombu.utils.json import dumps

REDIS_PORT = 6379
Encoded = tuple[str, str]
"""(channel, message) for one PUBLISH."""


def same_server(broker_url: str, redis_url: str) -> bool:
    """Pub/sub is not scoped by database: the same server is enough. Host and port
    (Redis's default when left out) name a TCP server, credentials aside; a Unix socket's
    path names its server. A name and its address (localhost, 127.0.0.1) count as two:
    only the usual, slower path follows from that."""
    a, b = urlsplit(broker_url), urlsplit(redis_url)
    if a.scheme != b.scheme:
        return False
    if a.scheme in ("unix", "redis+socket"):
        return a.path == b.path
    if a.scheme not in ("redis", "rediss"):  # sentinel://h1:26379;sentinel://h2:26379, ...
        return a.netloc == b.netloc
    try:
        return (a.hostname, a.port or REDIS_PORT) == (b.hostname, b.port or REDIS_PORT)
    except ValueError:  # a port that is not a number: not comparable, the usual path
        return False


@dataclass(frozen=True)
class Envelope:
    """What kombu published for the first event of a type, less its body and tag."""

    topic: str
    message: dict[str, Any]
    properties: dict[str, Any]

    @classmethod
    def of(cls, topic: str, message: dict[str, Any]) -> Envelope | None:
        """None for an envelope this module does not know how to fill (kept on kombu)."""
        properties = message.get("properties")
        if (not isinstance(properties, dict) or properties.get("body_encoding") != "base64"
                or message.get("content-type") != "application/json"
                or "delivery_tag" not in properties):
            return None
        return cls(topic, {k: v for k, v in message.items() if k not in ("body", "properties")},
                   {k: v for k, v in properties.items() if k != "delivery_tag"})

    def fill(self, event: dict[str, Any]) -> Encoded:
        body = b64encode(dumps(event).encode("utf-8")).decode("ascii")
        properties = {**self.properties, "delivery_tag": str(uuid.uuid4())}
        # Keys in kombu's order (body, then its headers, then properties): byte for byte.
        return self.topic, dumps({"body": body, **self.message, "properties": properties})


_ENCODERS: weakref.WeakSet[EventEncoder] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """In a forked child, before any of its threads runs: the parent's lock (maybe held)
    and connection are not the child's. (Checked on each call instead, two threads of the
    child could each swap in a lock of their own.) One hook for every encoder: a hook
    each would pile up with every client a process makes, and run at every fork."""
    for encoder in list(_ENCODERS):
        encoder._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class EncoderUnavailable(RuntimeError):
    """The encoder's connection failed moments ago; send the event the usual way."""


BUILD_RETRY_S = 5.0


class EventEncoder:
    """One per process (rebuilt after a fork). Thread-safe: a producer's client may be
    shared by threads, and the first event of a type is captured from a shared channel."""

    def __init__(self) -> None:
        self._dispatcher: Any = None
        self._captured: list[tuple[str, dict[str, Any]]] = []
        self._envelopes: dict[str, Envelope | None] = {}
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self.broker_prefix = ""
        """The broker transport's `global_keyprefix` (known once the first event is
        encoded): a Lua script publishing an encoded event puts it before the channel."""
        _ENCODERS.add(self)  # reset in a forked child (_after_fork_in_child)

    def _after_fork(self) -> None:
        self._lock, self._dispatcher, self._retry_at = threading.Lock(), None, 0.0

    def encode(self, app: Celery, hostname: str, type_: str, **fields: Any) -> Encoded:
        """The event's one PUBLISH (clock, pid, hostname and timestamp set as Celery does).
        EncoderUnavailable at once for BUILD_RETRY_S after its connection could not be made
        (the caller sends the event the usual way): during a broker outage each thread
        would otherwise wait a whole connect timeout in turn, holding the lock."""
        with self._lock:
            dispatcher = self._dispatcher
            if dispatcher is None or dispatcher.hostname != hostname:
                if time.monotonic() < self._retry_at:
                    raise EncoderUnavailable("the events connection failed moments ago")
                if dispatcher is not None:
                    dispatcher.connection.release()  # another hostname: this one is done
                    self._dispatcher = None
                try:
                    dispatcher = self._build(app, hostname)
                except Exception:
                    self._retry_at = time.monotonic() + BUILD_RETRY_S
                    raise
                self._dispatcher = dispatcher
                self._envelopes.clear()
            envelope = self._envelopes.get(type_)
            if envelope is not None:  # the event made as the dispatcher's publish makes it
                event = dispatcher._prepare_event(type_, fields)
            else:
                self._captured.clear()
                dispatcher.send(type_, **fields)
                if len(self._captured) != 1:
                    raise RuntimeError(
                        f"expected one publish for {type_}, got {len(self._captured)}")
                topic, message = self._captured[0]
                self._envelopes.setdefault(type_, Envelope.of(topic, message))
                return topic, dumps(message)
        return envelope.fill(event)

    def _build(self, app: Celery, hostname: str) -> Any:
        dispatcher = app.events.Dispatcher(app.connection_for_write(), hostname=hostname,
                                           enabled=True, buffer_while_offline=False)
        channel = dispatcher.producer.channel
        # kombu's client adds it to every channel it publishes on; a script's PUBLISH must too
        self.broker_prefix = getattr(channel, "global_keyprefix", None) or ""

        def keep(exchange: str, message: Any, routing_key: str, **_: Any) -> None:
            for topic in channel._get_publish_topics(exchange, routing_key):
                self._captured.append((topic, message))

        channel._put_fanout = keep  # this channel only ever encodes
        return dispatcher
