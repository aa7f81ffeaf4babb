"""A Redis broker transport that survives anything a queue item carries.

kombu's Redis transport decodes each popped item inside the worker's event loop, and
Celery takes it in there too: one item no producer of ours would send (not JSON, a type
marker that does not decode, JSON nested 100,000 deep, a body that is not a task call)
raises there and the worker dies with "Unrecoverable error". This transport passes every
item through one decode boundary (`delivery.inspect_delivery`), sets refused items aside
in a bounded dead-letter store with the reason, and goes on consuming. Reliable fetch
(`reliable_fetch`) adds the poison rule for whatever still kills a worker.
"""

from __future__ import annotations

import logging
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from pluginpool.policy.errors import MalformedMessageError
from pluginpool.tasks.delivery import DeliveryLimits, check_message
from pluginpool.tasks.reliable_fetch import ReliableFetchChannel

logger = logging.getLogger("pluginpool.transport")


class _GuardedRead:
    """Guards the paths that do not go through the claim: items read by kombu's own BRPOP
    (consumers without ack emulation) and acknowledgements after the connection was lost.

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
        if getattr(self, "ack_emulation", True):
            # Claimed items pass the decode boundary in reliable_fetch instead.
            return super()._brpop_read(**options)  # type: ignore[misc]
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
        except ValueError as exc:  # JSONDecodeError included
            self.set_aside(getattr(exc, "doc", "") or repr(exc),  # type: ignore[attr-defined]
                           reason=f"not JSON: {exc}", queue=None)
        except UnicodeDecodeError as exc:
            self.set_aside(repr(exc.object[:200]),  # type: ignore[attr-defined]
                           reason="not UTF-8", queue=None)
        return True

    def _receive_one(self, c: Any) -> Any:
        """Fanout (broadcast) messages: kombu catches only TypeError and ValueError from
        decoding them; a type marker that does not decode raises anything else."""
        try:
            return super()._receive_one(c)  # type: ignore[misc]
        except self.connection_errors:  # type: ignore[attr-defined]
            raise
        except Exception as exc:
            logger.error("dropped a broadcast message that does not decode: %s: %s",
                         type(exc).__name__, exc)
            raise Empty() from None


class _GuardedDelivery:
    """Messages decoded by kombu itself (fanout, plain BRPOP) are checked at the same
    boundary as claimed ones; `deliver_checked` is the way in for claimed messages, which
    the boundary has already checked."""

    channels: list[Any]

    def _deliver(self, message: Any, queue: str | None) -> None:
        channel = self.channels[0] if self.channels else None
        if channel is not None and queue is not None:
            config = channel.delivery_config
            try:
                check_message(message, queue, DeliveryLimits(
                    max_bytes=config.max_message_bytes, max_depth=config.max_depth))
            except MalformedMessageError as exc:
                channel.set_aside(_preview(message), reason=exc.reason, queue=queue)
                return
        super()._deliver(message, queue)  # type: ignore[misc]

    def deliver_checked(self, message: Any, queue: str) -> None:
        super()._deliver(message, queue)  # type: ignore[misc]


def _preview(message: Any) -> str:
    try:
        return str(dumps(message))
    except Exception as exc:  # whatever it holds, the dead letter must be written
        return f"<not re-encodable: {type(exc).__name__}>"


class GuardedChannel(_GuardedRead, ReliableFetchChannel, kombu_redis.Channel):  # type: ignore[misc,unused-ignore]
    pass


class GuardedRedisTransport(_GuardedDelivery, kombu_redis.Transport):  # type: ignore[misc,unused-ignore]
    """kombu's Redis transport with reliable fetch (see `reliable_fetch`), the poison rule
    and one decode boundary (see `delivery`)."""

    Channel = GuardedChannel


class GuardedSentinelChannel(_GuardedRead, ReliableFetchChannel, kombu_redis.SentinelChannel):  # type: ignore[misc,unused-ignore]
    pass


class GuardedSentinelTransport(_GuardedDelivery, kombu_redis.SentinelTransport):  # type: ignore[misc,unused-ignore]
    """The same guard for a Sentinel-managed broker."""

    Channel = GuardedSentinelChannel


TRANSPORT_PATH = f"{__name__}:GuardedRedisTransport"
SENTINEL_TRANSPORT_PATH = f"{__name__}:GuardedSentinelTransport"
