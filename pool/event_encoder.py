"""Celery events encoded exactly as the broker transport would publish them, so a Lua
script that runs anyway (the outcome record) can PUBLISH one in the same round trip.

Over Redis an event is one PUBLISH of kombu's JSON envelope on the events exchange's
channel. The encoder owns a dispatcher on a connection of its own whose channel keeps
what it would publish instead of sending it; receivers (the aggregator, Flower) cannot
tell the difference. Only for a broker on the same Redis server as pluginpool's own
(`same_server`); otherwise events are sent the usual way.
"""

from __future__ import annotations

import os
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


class EventEncoder:
    """One per worker process (rebuilt after a fork); not thread-safe, like a pool child."""

    def __init__(self) -> None:
        self._dispatcher: Any = None
        self._pid = 0
        self._captured: list[Encoded] = []

    def encode(self, app: Celery, hostname: str, type_: str, **fields: Any) -> Encoded:
        """The event's one PUBLISH (clock, pid, hostname and timestamp set as Celery does)."""
        if self._dispatcher is None or self._pid != os.getpid():
            self._dispatcher = self._build(app, hostname)
            self._pid = os.getpid()
        self._captured.clear()
        self._dispatcher.send(type_, **fields)
        if len(self._captured) != 1:
            raise RuntimeError(f"expected one publish for {type_}, got {len(self._captured)}")
        return self._captured[0]

    def _build(self, app: Celery, hostname: str) -> Any:
        dispatcher = app.events.Dispatcher(app.connection_for_write(), hostname=hostname,
                                           enabled=True, buffer_while_offline=False)
        channel = dispatcher.producer.channel

        def keep(exchange: str, message: Any, routing_key: str, **_: Any) -> None:
            for topic in channel._get_publish_topics(exchange, routing_key):
                self._captured.append((topic, dumps(message)))

        channel._put_fanout = keep  # this channel only ever encodes
        return dispatcher
