"""A Redis broker transport that survives messages no producer of ours sent.

kombu's Redis transport decodes each popped item with `json.loads` inside its event
loop: one non-JSON item on a queue (anyone can LPUSH to a Redis list) raises there and
the worker dies with "Unrecoverable error". This transport sets such items aside in a
bounded dead-letter list with the reason, logs it, and goes on consuming.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from typing import Any

from kombu.transport import redis as kombu_redis

from pluginpool.tasks.reliable_fetch import ReliableFetchChannel

logger = logging.getLogger("pluginpool.transport")

DEAD_LETTER_OPTION = "pluginpool_dead_letter_key"
DEAD_LETTER_LENGTH = 1_000
RAW_PREVIEW_CHARS = 2_000


def malformed_reason(message: Any) -> str | None:
    """Why a decoded item cannot be a kombu message, or None if it has the right shape."""
    if not isinstance(message, dict):
        return f"message is a JSON {type(message).__name__}, not an object"
    properties = message.get("properties")
    if not isinstance(properties, dict):
        return "message has no 'properties' object"
    if not isinstance(properties.get("delivery_tag"), str | int):
        return "message has no delivery_tag"
    if not isinstance(properties.get("delivery_info", {}), dict):
        return "delivery_info is not an object"
    if not isinstance(message.get("headers") or {}, dict):
        return "headers is not an object"
    body = message.get("body")
    if properties.get("body_encoding") == "base64":
        if not isinstance(body, str):
            return "base64 body is not a string"
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "body is not valid base64"
    return None


class _GuardedRead:
    """Catches items that are not JSON at all (the transport checks the rest), and
    acknowledgements that arrive after the broker connection was lost.

    kombu acknowledges through the channel's transport; when Redis restarts, a late ack
    can reach a channel whose transport is already torn down and raise AttributeError in
    the worker's event loop ("Unrecoverable error": the worker dies). Such a message is
    still recorded as unacknowledged in Redis and comes back after the visibility timeout.
    """

    connection: Any

    def _transport_gone(self) -> bool:
        return getattr(self.connection, "client", None) is None

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> Any:
        if self._transport_gone():
            logger.warning("ack of %s after the broker connection was lost: it will be "
                           "redelivered after the visibility timeout", delivery_tag)
            return None
        return super().basic_ack(delivery_tag, multiple=multiple)  # type: ignore[misc]

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> Any:
        if self._transport_gone():
            logger.warning("reject of %s after the broker connection was lost: it will be "
                           "redelivered after the visibility timeout", delivery_tag)
            return None
        return super().basic_reject(delivery_tag, requeue=requeue)  # type: ignore[misc]

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
        except json.JSONDecodeError as exc:
            transport: Any = self.connection
            transport.dead_letter(self, exc.doc, reason=f"not JSON: {exc}")
        except UnicodeDecodeError as exc:
            transport = self.connection
            transport.dead_letter(self, repr(exc.object[:200]), reason="not UTF-8")
        return True


class _GuardedDelivery:
    """Malformed messages are dead-lettered instead of fatal."""

    channels: list[Any]
    client: Any

    def _deliver(self, message: Any, queue: str | None) -> None:
        reason = malformed_reason(message)
        if reason is not None:
            channel = self.channels[0] if self.channels else None
            self.dead_letter(channel, json.dumps(message)[:RAW_PREVIEW_CHARS], reason=reason,
                             queue=queue)
            return
        super()._deliver(message, queue)  # type: ignore[misc]

    def dead_letter(self, channel: Any, raw: str, *, reason: str, queue: str | None = None) -> None:
        logger.error("dropping malformed message from queue %s: %s", queue or "?", reason)
        options: dict[str, Any] = getattr(self.client, "transport_options", None) or {}
        key = options.get(DEAD_LETTER_OPTION)
        if not key or channel is None:
            return
        entry = json.dumps({"reason": reason, "queue": queue, "at": time.time(),
                            "raw": raw[:RAW_PREVIEW_CHARS]})
        try:
            with channel.conn_or_acquire() as client:
                client.lpush(key, entry)
                client.ltrim(key, 0, DEAD_LETTER_LENGTH - 1)
        except Exception as exc:  # the dead-letter list is best effort; consuming goes on
            logger.warning("could not store dead letter: %r", exc)


class GuardedChannel(_GuardedRead, ReliableFetchChannel, kombu_redis.Channel):  # type: ignore[misc,unused-ignore]
    pass


class GuardedRedisTransport(_GuardedDelivery, kombu_redis.Transport):  # type: ignore[misc,unused-ignore]
    """kombu's Redis transport with reliable fetch (see `reliable_fetch`) and malformed
    messages dead-lettered instead of fatal."""

    Channel = GuardedChannel


class GuardedSentinelChannel(_GuardedRead, ReliableFetchChannel, kombu_redis.SentinelChannel):  # type: ignore[misc,unused-ignore]
    pass


class GuardedSentinelTransport(_GuardedDelivery, kombu_redis.SentinelTransport):  # type: ignore[misc,unused-ignore]
    """The same guard for a Sentinel-managed broker."""

    Channel = GuardedSentinelChannel


TRANSPORT_PATH = f"{__name__}:GuardedRedisTransport"
SENTINEL_TRANSPORT_PATH = f"{__name__}:GuardedSentinelTransport"
