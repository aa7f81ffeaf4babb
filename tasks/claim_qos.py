"""kombu's QoS over pluginpool's unacknowledged record (see `delivery_record`).

Acknowledging, rejecting, handing back at shutdown and the periodic sweep, where a worker
beats its consumer heartbeat and returns what dead consumers held (`rescue.lua`).
"""

from __future__ import annotations

import logging
from time import time
from typing import Any

from kombu.transport import virtual
from kombu.transport.redis import QoS as RedisQoS
from kombu.utils.encoding import bytes_to_str

from pluginpool.tasks.delivery_record import (
    ACK,
    HANDBACK,
    RESCUE,
    run_script,
    unprefixed,
)

logger = logging.getLogger("pluginpool.transport")

OUTCOME_STORED_OPTION = "pluginpool_outcome_stored"
"""Transport option: called with a reserved kombu message at a warm shutdown; True when its
job's outcome is stored already, so the message is acknowledged instead of handed back."""


class ClaimAwareQoS(RedisQoS):
    """kombu's QoS over the whole unacknowledged record (see `delivery_record`).

    Messages `claim.lua` already recorded are not written again; an ack drops the whole
    record in one script (or counts a late ack); a message the worker hands back itself
    (a reject with requeue, a warm shutdown) does not count as a delivery without outcome.
    """

    channel: Any

    def append(self, message: Any, delivery_tag: Any) -> None:
        claimed: set[str] = self.channel.connection.__dict__.setdefault("claimed_tags", set())
        if delivery_tag in claimed:
            claimed.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        self.forget(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if requeue:
            self.hand_back(delivery_tag)
        else:
            self.forget(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def restore_unacked(self, client: Any = None) -> None:
        """Warm shutdown: hand every reserved message back, except those whose job already
        has its outcome stored (`OUTCOME_STORED_OPTION`): their run finished as the worker
        stopped, but the main process had stopped reading its pool processes' results, so
        their acknowledgement never came, and handed back they ran a second time (seen in
        the rolling-restart test). If the connection is already gone the records stay, and
        the next sweep of another worker returns them once this channel's heartbeat has
        stopped."""
        if getattr(self.channel.connection, "client", None) is None:
            logger.warning("connection lost before %d reserved messages could be handed "
                           "back: they return once this consumer's heartbeat stops",
                           len(self._delivered or {}))
            return
        done = self.channel._option(OUTCOME_STORED_OPTION, None)
        with self.channel.conn_or_acquire(client) as client:
            delivered: dict[str, Any] = self._delivered or {}
            for tag, message in delivered.items():
                if done is not None and done(message):
                    logger.info("reserved message %s: its job's outcome is stored, so it is "
                                "acknowledged, not handed back", tag)
                    self.forget(tag, client=client)
                    continue
                self.hand_back(tag, client=client, leftmost=False)
            delivered.clear()
        # The heartbeat entry is left to age: a sweep then finds nothing held and drops it,
        # or returns whatever a failed hand-back left behind.

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        """The periodic sweep: beat this consumer's heartbeat, return what dead consumers
        held (in seconds, judged by heartbeat), then kombu's own sweep (the last resort,
        for a holder that is alive but stuck past the visibility timeout)."""
        self.rescue_dead_consumers()
        super().restore_visible(start, num, interval)

    def rescue_dead_consumers(self) -> int:
        config = self.channel.delivery_config
        prefix = self.channel.global_keyprefix or ""
        consumers = prefix + config.consumers_key
        now = time()
        bound = now - config.dead_after_s
        returned = 0
        with self.channel.conn_or_acquire() as client:
            unprefixed(client, "ZADD", consumers, now, self.channel.consumer_id)
            self.channel.reregister_if_declared_dead(client)
            self.channel.retry_quarantine_outcomes(client)
            dead = unprefixed(client, "ZRANGEBYSCORE", consumers, "-inf", f"({bound}",
                               "LIMIT", 0, 20)
            for raw in dead or []:
                victim = bytes_to_str(raw)
                keys = [prefix + self.unacked_key, prefix + self.unacked_index_key,
                        prefix + config.owner_key, prefix + config.held_key(victim),
                        consumers, prefix + config.stats_key,
                        prefix + config.consumes_key(victim)]
                count = int(run_script(client, RESCUE, keys, [
                    victim, repr(bound), prefix, prefix + config.waiters_prefix,
                    prefix + config.ready_prefix, prefix + config.wake_prefix,
                    config.wake_depth]))
                if count > 0:
                    returned += count
                    logger.warning("consumer %s missed its heartbeat for over %.0f s: "
                                   "returned the %d messages it held to their queues",
                                   victim, config.dead_after_s, count)
        return returned

    def forget(self, delivery_tag: Any, client: Any = None) -> None:
        """Drop the delivery's record: it has its outcome."""
        keys = self.channel.record_keys()
        with self.channel.conn_or_acquire(client) as client:
            run_script(client, ACK, keys, [delivery_tag, self.channel.consumer_id])

    def hand_back(self, delivery_tag: Any, *, client: Any = None, leftmost: bool = True) -> None:
        """Return a message to its queue from a live worker: not a delivery without outcome.
        `leftmost` (a requeue) puts it behind the queue's other messages, else (a warm
        shutdown's reserved messages) in front. One script (`handback.lua`) for what a
        claim recorded; kombu's restore for anything else."""
        config = self.channel.delivery_config
        prefix = self.channel.global_keyprefix or ""
        with self.channel.conn_or_acquire(client) as client:
            handed = int(run_script(client, HANDBACK, self.channel.record_keys()[:5], [
                delivery_tag, self.channel.consumer_id, "back" if leftmost else "front",
                prefix, prefix + config.waiters_prefix, prefix + config.ready_prefix,
                prefix + config.wake_prefix, config.wake_depth]))
            if handed < 0:
                self.restore_by_tag(delivery_tag, client=client, leftmost=leftmost)
