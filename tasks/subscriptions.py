"""Delivering error events and breaker transitions from Redis pub/sub to handlers.

One subscriber thread per client, started on the first `on_error`/`on_breaker_change` and
stopped by `close()`. A handler that raises is logged and never stops the others.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from pluginpool.policy.redis_text import as_text

logger = logging.getLogger("pluginpool.subscriptions")

Handler = Callable[[dict[str, Any]], None]
ALL_PLUGINS = "*"


class Subscriptions:
    """Handlers per (channel, plugin id or "*")."""

    def __init__(self, client: redis.Redis, channels: list[str]) -> None:
        self._client = client
        self._channels = channels
        self._handlers: dict[str, list[tuple[str, Handler]]] = {ch: [] for ch in channels}
        self._lock = threading.Lock()
        self._thread: Any = None
        self._pubsub: Any = None
        self._gap_handlers: list[Callable[[], None]] = []

    def add(self, channel: str, plugin_id: str, handler: Handler) -> None:
        with self._lock:
            self._handlers[channel].append((plugin_id, handler))
            if self._thread is None:
                self._start()

    def on_gap(self, handler: Callable[[], None]) -> None:
        """Call `handler` whenever events may have been missed (the subscription's
        connection failed; pub/sub keeps nothing while it is down)."""
        with self._lock:
            self._gap_handlers.append(handler)

    def _start(self) -> None:
        pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
        pubsub.subscribe(**{ch: self._dispatch for ch in self._channels})
        confirmed: set[str] = set()
        deadline = time.monotonic() + 10
        while confirmed != set(self._channels) and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.5)
            if message and message["type"] == "subscribe":
                confirmed.add(as_text(message["channel"]))
        self._pubsub = pubsub
        if pubsub.connection is not None:
            # redis-py reconnects and resubscribes on its own, often without surfacing an
            # error: its connect callbacks are where a gap shows.
            pubsub.connection.register_connect_callback(self._on_reconnect)
        self._thread = pubsub.run_in_thread(sleep_time=0.5, daemon=True,
                                            exception_handler=self._on_thread_error)

    def _on_reconnect(self, connection: Any) -> None:
        self._gap()

    def _on_thread_error(self, exc: BaseException, pubsub: Any, thread: Any) -> None:
        logger.warning("event subscription error, reconnecting: %r", exc)
        self._gap()
        time.sleep(0.5)

    def _gap(self) -> None:
        with self._lock:
            gap_handlers = list(self._gap_handlers)
        for handler in gap_handlers:
            try:
                handler()
            except Exception:
                logger.exception("event gap handler %r failed", handler)

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = as_text(message["channel"])
        try:
            event = json.loads(as_text(message["data"]))
        except ValueError:
            logger.warning("ignoring a non-JSON event on %s", channel)
            return
        with self._lock:
            handlers = list(self._handlers.get(channel, []))
        for plugin_id, handler in handlers:
            if plugin_id not in (ALL_PLUGINS, event.get("plugin_id", event.get("plugin"))):
                continue
            try:
                handler(event)
            except Exception:
                logger.exception("event handler %r failed", handler)

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            pubsub, self._pubsub = self._pubsub, None
        # Joined without the lock: a message being dispatched takes it, and the join
        # would wait out its whole timeout.
        if thread is not None:
            thread.stop()
            thread.join(timeout=5)
        if pubsub is not None:
            pubsub.close()
