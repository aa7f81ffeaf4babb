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
import uuid
from base64 import b64encode
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from kombu.utils.json import dumps

Encoded = tuple[str, str]
"""(channel, message) for one PUBLISH."""


def same_server(broker_url: str, redis_url: str) -> bool:
    """Pub/sub is not scoped by database: the same server is enough."""
    a, b = urlsplit(broker_url), urlsplit(redis_url)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)


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
        return self.topic, dumps({**self.message, "body": body, "properties": properties})


class EventEncoder:
    """One per process (rebuilt after a fork). Thread-safe: a producer's client may be
    shared by threads, and the first event of a type is captured from a shared channel."""

    def __init__(self) -> None:
        self._dispatcher: Any = None
        self._pid = os.getpid()
        self._captured: list[tuple[str, dict[str, Any]]] = []
        self._envelopes: dict[str, Envelope | None] = {}
        self._lock = threading.Lock()

    def encode(self, app: Celery, hostname: str, type_: str, **fields: Any) -> Encoded:
        """The event's one PUBLISH (clock, pid, hostname and timestamp set as Celery does)."""
        if self._pid != os.getpid():  # a fork: the parent's lock (maybe held) and connection
            self._lock, self._dispatcher, self._pid = threading.Lock(), None, os.getpid()
        with self._lock:
            dispatcher = self._dispatcher
            if dispatcher is None or dispatcher.hostname != hostname:
                if dispatcher is not None:
                    dispatcher.connection.release()  # another hostname: this one is done
                dispatcher = self._dispatcher = self._build(app, hostname)
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

        def keep(exchange: str, message: Any, routing_key: str, **_: Any) -> None:
            for topic in channel._get_publish_topics(exchange, routing_key):
                self._captured.append((topic, message))

        channel._put_fanout = keep  # this channel only ever encodes
        return dispatcher
