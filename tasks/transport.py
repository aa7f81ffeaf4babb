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


class GuardedChannel(kombu_redis.Channel):  # type: ignore[misc,unused-ignore]
    """Catches items that are not JSON at all (the transport checks the rest)."""

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


class GuardedRedisTransport(kombu_redis.Transport):  # type: ignore[misc,unused-ignore]
    """kombu's Redis transport with malformed messages dead-lettered instead of fatal."""

    Channel = GuardedChannel

    def _deliver(self, message: Any, queue: str | None) -> None:
        reason = malformed_reason(message)
        if reason is not None:
            channel = self.channels[0] if self.channels else None
            self.dead_letter(channel, json.dumps(message)[:RAW_PREVIEW_CHARS], reason=reason,
                             queue=queue)
            return
        super()._deliver(message, queue)

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


TRANSPORT_PATH = f"{__name__}:GuardedRedisTransport"
