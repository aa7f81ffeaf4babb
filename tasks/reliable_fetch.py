"""Reliable fetch for kombu's Redis transport: no instant where a message can be lost,
and a worker's cost set by its work, not by how many queues it consumes.

kombu consumes with `BRPOP` and then, from the worker, records the message in its unacked
hash. A worker SIGKILLed between the two loses that message for good (seen in the chaos
test: 1 job in 2,000). Redis has no blocking pop over several lists that also records the
message somewhere, so this channel splits consuming in two:

- **claim**: `claim.lua` takes the next message of the worker group's *ready index* (the
  queue lists that may hold messages, served round robin) and records it as unacked in one
  atomic script. A worker that dies after it leaves the message recorded with its
  consumer, from which any live worker returns it once the consumer's heartbeat stops
  (`rescue.lua`), or kombu's restore sweep after the visibility timeout. Claims repeat
  while they find messages.
- **wait**: when nothing is ready, the worker blocks on `BLPOP` over its group's one
  wake-up list. Every publish through this transport (`publish.lua`) pushes the message,
  indexes its queue for every group consuming it and rings their wake-up lists, in one
  atomic step. Messages pushed by a producer that does not index them (plain kombu or
  Celery) are found through Redis keyspace notifications (enabled by the worker where the
  server allows it, heard on the connection's broadcast subscription), and by a rescan
  of the worker's queues: in full at start, after a reconnect or a resubscribe, and once
  per idle wait (busy or idle) where notifications do not reach the connection; as a
  rolling safety net otherwise (a slice of at most `RESCAN_SLICE_MAX` lists a second, a
  full pass every `rescan_s` or longer), so an idle worker's cost does not grow with its
  plugin count.

This is the "reliable queue" pattern (Redis `LMOVE` docs; Sidekiq Pro's super_fetch),
written here because kombu has no such mode and `BLMOVE` takes a single source list.
"""

from __future__ import annotations

import json
import logging
from queue import Empty
from time import monotonic, time
from typing import Any

import redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from redis.exceptions import NoScriptError

from pluginpool.policy.errors import MalformedMessageError
from pluginpool.tasks.claim_qos import ClaimAwareQoS
from pluginpool.tasks.delivery import DeliveryLimits, inspect_delivery
from pluginpool.tasks.delivery_record import CLAIM, DEAD_LETTER, run_script, unprefixed
from pluginpool.tasks.ready_index import ReadyIndexChannel

logger = logging.getLogger("pluginpool.transport")

IDLE_WAIT_OPTION = "pluginpool_idle_wait_s"
QUARANTINE_HOOK_OPTION = "pluginpool_on_quarantine"
"""Transport option: called with the delivery tag (the dead letter's id) of each message the
poison rule quarantines, so its job gets an outcome (the worker stores its failure)."""
CLAIM_SOURCE = CLAIM.source
CLAIM_SHA = CLAIM.sha
RAW_PREVIEW_CHARS = 2_000
RESCAN_SLICE_MAX = 8
"""Lists the rolling safety-net rescan rechecks per second at most (`_rescan_slice`)."""
"""How much of an item that is not even a kombu message the dead-letter entry keeps."""


class ReliableFetchChannel(ReadyIndexChannel):
    """Mixin for kombu's Redis channel: claim-then-wait instead of BRPOP (see module doc).

    It reuses kombu's single blocking connection and event-loop plumbing: the "BRPOP"
    handler slot now reads either a claim reply or a wake-up.
    """

    QoS = ClaimAwareQoS

    # --- consuming: claim while there is work, wait on the wake-up list when there is none

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self.ack_emulation:
            super()._brpop_start(timeout)  # type: ignore[misc]
            return
        if not self.active_queues:
            return
        config = self.delivery_config
        if self._claim_next or self.__dict__.get("_dirty"):
            self._claim_next = True
            self.flush_registrations()  # gathered at start: written before the first claim
            self.__dict__["_claimed_once"] = True
            prefix = self.global_keyprefix or ""
            consumed: dict[str, str] = self.__dict__.setdefault("_consumed", {})
            dirty: set[str] = self.__dict__.setdefault("_dirty", set())
            now = monotonic()
            heard = self._keyevents_heard()
            if now >= self._rescan_at or (not heard and self._rescan_at == float("inf")):
                # In full: at start, after a reconnect or a resubscribe, and where keyspace
                # notifications do not reach this connection, once per idle wait at most
                # (every consumed list is a key of the claim: not at every busy claim).
                dirty.update(consumed)
                self._rescan_at = float("inf") if heard else now + float(
                    self._option(IDLE_WAIT_OPTION, self.brpop_timeout) or 0)
                self._slice_at = now + 1.0
            elif now >= self._slice_at:
                dirty.update(self._rescan_slice(consumed, config.rescan_s))
                self._slice_at = now + 1.0
            pairs = [part for key in dirty if key in consumed for part in (key, consumed[key])]
            dirty.clear()
            keys = [*self.record_keys()[:5], prefix + config.dead_letter_key,
                    prefix + config.dead_letter_index_key, prefix + config.consumers_key,
                    self._ready_key(), prefix + config.consumes_key(self.consumer_id),
                    prefix + config.quarantine_pending_key, *pairs]
            record = "0" if self._all_without_ack() else "1"
            command: list[Any] = ["EVALSHA", CLAIM.sha, len(keys), *keys, repr(time()),
                                  self.consumer_id, config.max_deliveries,
                                  config.dead_letter_max, record,
                                  prefix + config.ready_prefix, prefix + config.wake_prefix,
                                  config.wake_depth, config.scan_limit]
        else:
            if timeout is None:
                # With keyspace notifications a push wakes us: wait as long as kombu would.
                # Without, wake up after the idle wait and rescan.
                timeout = (self.brpop_timeout if self._keyevents_heard()
                           else self._option(IDLE_WAIT_OPTION, self.brpop_timeout))
            command = ["BLPOP", self._wake_key(), timeout or 0]
        self._claim_in_flight = self._claim_next
        self._claim_command = command if self._claim_next else None
        self._in_poll = self.client.connection
        self._brpop_sent_at = self._health_clock(0 if self._claim_next else timeout or 0)
        self.client.connection.send_command(*command)

    def _rescan_slice(self, consumed: dict[str, str], rescan_s: float) -> list[str]:
        """The next lists of the rolling safety-net rescan (one slice a second at most).

        A full pass takes `rescan_s`, or longer for a worker consuming more than
        `RESCAN_SLICE_MAX * rescan_s` lists: an idle worker's cost stays a small constant
        whatever the plugin count (10,000 plugins: a pass in about 80 minutes). Lost
        notifications are rare (a reconnect or a resubscribe triggers a full rescan); this
        only bounds how long one can go unnoticed."""
        order: list[str] | None = self.__dict__.get("_rescan_order")
        if order is None:  # dropped whenever a queue is registered or unregistered
            order = list(consumed)
            self.__dict__["_rescan_order"] = order
        if not order:
            return []
        size = min(RESCAN_SLICE_MAX, max(1, -(-len(order) // max(1, int(rescan_s)))))
        start = self._slice_cursor % len(order)
        picked = [order[(start + step) % len(order)] for step in range(min(size, len(order)))]
        self._slice_cursor = start + len(picked)
        return picked

    def _health_clock(self, wait_s: float) -> float:
        """The send time kombu's half-open check (`maybe_check_brpop_health`) counts from.

        kombu drops a connection whose reply is `brpop_timeout + health_check_interval`
        overdue; a wake-up wait longer than `brpop_timeout` would be dropped while alive, so
        its clock starts that much later."""
        return monotonic() + max(0.0, wait_s - (self.brpop_timeout or 0))

    def _on_connection_disconnect(self, connection: Any) -> None:
        """A dropped consuming connection (half-open, reconnect): rescan and claim first
        once it is back; messages may have come while it was away, unnoticed."""
        if connection is self._in_poll:
            self._claim_next = True
            self._rescan_at = 0.0
        super()._on_connection_disconnect(connection)  # type: ignore[misc]

    def _brpop_read(self, **options: Any) -> Any:
        if not self.ack_emulation:
            return super()._brpop_read(**options)  # type: ignore[misc]
        claiming = self._claim_in_flight
        try:
            try:
                reply = self.client.parse_response(
                    self.client.connection, "EVALSHA" if claiming else "BLPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                self._rescan_at = 0.0  # pushes during the outage went unnoticed: rescan
                raise
            except self.ResponseError as exc:
                reply = self._claim_failed(exc)
            if not claiming:
                self._claim_next = True  # woken, or the wait timed out: look again
                raise Empty()
            key, item, status, tag, *quarantined = reply
            for poisoned in quarantined:
                logger.error("quarantined message %s in the dead-letter list: delivered %d "
                             "times without an outcome (poison rule)",
                             bytes_to_str(poisoned), self.delivery_config.max_deliveries)
                self._on_quarantined(bytes_to_str(poisoned))
            if int(status) < 0:
                # Nothing ready: wait on the wake-up list, unless a push was reported while
                # this claim was under way.
                self._claim_next = bool(self.__dict__.get("_dirty"))
                raise Empty()
            self._deliver_claimed(bytes_to_str(key), item, bytes_to_str(tag) or None)
            return True
        finally:
            self._claim_in_flight = False
            self._in_poll = None
            self._flush_brpop_reauth()  # type: ignore[attr-defined]

    def _on_quarantined(self, tag: str) -> None:
        """Hand a quarantined message to the worker's hook (`QUARANTINE_HOOK_OPTION`): its
        producer is waiting for an outcome. Once the hook has stored it, the id leaves the
        pending set claim.lua put it in; a failing hook (or a worker that dies first)
        leaves it there for the next restore sweep (`retry_quarantine_outcomes`)."""
        hook = self._option(QUARANTINE_HOOK_OPTION, None)
        if hook is None:
            return
        try:
            hook(tag)
        except Exception:
            logger.exception("could not record the outcome of quarantined message %s (the "
                             "restore sweep tries again)", tag)
            return
        prefix = self.global_keyprefix or ""
        with self.conn_or_acquire() as client:
            unprefixed(client, "SREM", prefix + self.delivery_config.quarantine_pending_key,
                       tag)

    def retry_quarantine_outcomes(self, client: Any) -> None:
        """Store the outcome of quarantined messages whose quarantining worker did not (it
        died, or Redis failed it): one SCARD when there are none."""
        if self._option(QUARANTINE_HOOK_OPTION, None) is None:
            return
        key = (self.global_keyprefix or "") + self.delivery_config.quarantine_pending_key
        if not unprefixed(client, "SCARD", key):
            return
        for raw in unprefixed(client, "SRANDMEMBER", key, 100) or []:
            self._on_quarantined(bytes_to_str(raw))

    def _claim_failed(self, exc: Exception) -> Any:
        """The claim's reply after an error reply, or Empty.

        NOSCRIPT (a fresh or restarted Redis, a flushed script cache): rescan, and claim
        again at once with EVAL, which also loads the script, so no reply is wasted on
        "try again"."""
        command = self._claim_command
        if command and (isinstance(exc, NoScriptError) or "NOSCRIPT" in str(exc)):
            self._rescan_at = 0.0
            try:
                # Keys are prefixed already; kombu's prefixing client would prefix again.
                return unprefixed(self.client, "EVAL", CLAIM.source, *command[2:])
            except self.ResponseError as again:
                exc = again
        # E.g. WRONGTYPE: someone replaced a queue with a non-list. Keep the worker alive,
        # say why, and try again after a wait.
        logger.error("claiming from the broker failed: %s", exc)
        self._claim_next = False
        raise Empty() from None

    def _deliver_claimed(self, key: str, item: bytes, tag: str | None) -> None:
        """Hand a claimed item to kombu and Celery, through the one decode boundary.

        `tag` is set when claim.lua recorded the delivery. Anything the boundary refuses,
        and any exception while kombu and Celery take the message in, sets the item aside
        in the dead-letter list with the reason and drops its record: the worker goes on,
        and nothing comes back from the restore sweep to fail again."""
        prefix = self.global_keyprefix or ""
        queue = key[len(prefix):] if prefix and key.startswith(prefix) else key
        queue = queue.rsplit(self.sep, 1)[0]
        config = self.delivery_config
        try:
            message = inspect_delivery(item, queue, DeliveryLimits(
                max_bytes=config.max_message_bytes, max_depth=config.max_depth))
        except MalformedMessageError as exc:
            self.set_aside(item, reason=exc.reason, queue=queue, tag=tag)
            return
        transport: Any = self.connection
        if tag is None:
            self._deliver_guarded(message, queue, item, tag=None)
            return
        claimed: set[str] = transport.__dict__.setdefault("claimed_tags", set())
        claimed.add(tag)
        try:
            delivered = self._deliver_guarded(message, queue, item, tag=tag)
        finally:
            taken = tag not in claimed
            claimed.discard(tag)
        if delivered and not taken:
            # Consumed without acknowledgement: the message has had its outcome. Over the
            # connection that just answered the claim: a pooled one may be half-open.
            self.qos.forget(tag, client=self.client)  # type: ignore[attr-defined]

    def _deliver_guarded(self, message: dict[str, Any], queue: str, item: bytes,
                         *, tag: str | None) -> bool:
        """Deliver; False when the message was set aside instead."""
        transport: Any = self.connection
        try:
            transport.deliver_checked(message, queue)
            return True
        except self.connection_errors:
            raise  # the record stays; the message returns once the connection is back
        except Exception as exc:
            logger.exception("taking in a message from %s failed", queue)
            self.set_aside(item, reason=f"delivery failed: {type(exc).__name__}: {exc}",
                           queue=queue, tag=tag)
            if tag is not None and tag in self.qos._delivered:  # type: ignore[attr-defined]
                virtual.QoS.ack(self.qos, tag)  # type: ignore[attr-defined]
            return False

    def set_aside(self, item: bytes | str, *, reason: str, queue: str | None,
                  tag: str | None = None) -> None:
        """Dead-letter one item with the reason (and drop its record, if it has one).

        The whole item is kept when it is a message that could be requeued (under the size
        bound); only a preview otherwise. If Redis is unreachable the item is logged and
        its record (if any) stays, so the restore sweep brings it back to be judged again.
        """
        config = self.delivery_config
        raw = bytes_to_str(item) if isinstance(item, bytes) else item
        if not isinstance(raw, str):
            raw = repr(item)
        keep = len(raw) <= config.max_message_bytes
        logger.error("dead-lettered a message from queue %s: %s", queue or "?", reason)
        now = time()
        entry_id = tag or f"x-{now:.6f}-{id(item):x}"
        entry = json.dumps({
            "id": entry_id, "queue": queue, "reason": reason[:2_000],
            "raw": raw if keep else raw[:RAW_PREVIEW_CHARS],
            "requeueable": keep and tag is not None,
            "first_seen": now, "at": now, "deliveries": 1 if tag else 0, "last_consumer": None,
        })
        prefix = self.global_keyprefix or ""
        keys = [prefix + config.dead_letter_key, prefix + config.dead_letter_index_key,
                *self.record_keys()[:5]]
        try:
            with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
                run_script(client, DEAD_LETTER, keys,
                           [entry_id, entry, repr(now), config.dead_letter_max, tag or ""])
        except redis.RedisError as exc:
            logger.warning("could not store the dead letter (it returns with the restore "
                           "sweep if it was recorded): %r", exc)

    # --- the unacknowledged record ---------------------------------------------------------

    def record_keys(self) -> list[str]:
        """The record's keys, as claim.lua and ack.lua take them (prefixed)."""
        prefix = self.global_keyprefix or ""
        config = self.delivery_config
        return [prefix + self.unacked_key, prefix + self.unacked_index_key,
                prefix + config.deliveries_key, prefix + config.owner_key,
                prefix + config.held_key(self.consumer_id), prefix + config.stats_key]

    def _all_without_ack(self) -> bool:
        """True when every queue is consumed without acknowledgements (nothing to record)."""
        no_ack = self.no_ack_consumers or set()
        if not no_ack:
            return False
        by_tag: dict[str, str] = getattr(self, "_tag_to_queue", {})
        acked = {queue for tag, queue in by_tag.items() if tag not in no_ack}
        return not any(queue in acked for queue in self.active_queues)
