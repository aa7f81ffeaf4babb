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
  server allows it), and by a rescan of the worker's queues: at start, after a reconnect,
  every `rescan_s` as a safety net, and after every idle wait where notifications are off.

This is the "reliable queue" pattern (Redis `LMOVE` docs; Sidekiq Pro's super_fetch),
written here because kombu has no such mode and `BLMOVE` takes a single source list.
"""

from __future__ import annotations

import json
import logging
from functools import cached_property
from queue import Empty
from time import monotonic, time
from typing import Any

import redis
from kombu.transport import virtual
from kombu.transport.redis import QoS as RedisQoS
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps
from redis.exceptions import NoScriptError

from pluginpool.policy.errors import MalformedMessageError
from pluginpool.tasks.delivery import DeliveryLimits, inspect_delivery
from pluginpool.tasks.delivery_record import (
    ACK,
    CLAIM,
    DEAD_LETTER,
    DELIVERY_OPTION,
    INDEX,
    PUBLISH,
    RESCUE,
    DeliveryConfig,
    LuaScript,
    new_consumer_id,
)

logger = logging.getLogger("pluginpool.transport")

IDLE_WAIT_OPTION = "pluginpool_idle_wait_s"
KEYEVENT_CHANNELS = ("lpush", "rpush")
"""Keyspace events that put a message on a list (Redis `notify-keyspace-events` E + l)."""

CLAIM_SOURCE = CLAIM.source
CLAIM_SHA = CLAIM.sha
RAW_PREVIEW_CHARS = 2_000
"""How much of an item that is not even a kombu message the dead-letter entry keeps."""


_unprefixed: Any = redis.Redis.execute_command
_unprefixed_in_pipe: Any = redis.client.Pipeline.execute_command


def run_script(client: Any, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
    """EVALSHA, loading the script on NOSCRIPT. Keys are passed already prefixed: kombu's
    key-prefixing client would prefix only the first key of an EVALSHA."""
    try:
        return _unprefixed(client, "EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return _unprefixed(client, "EVAL", script.source, len(keys), *keys, *args)


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
        """Warm shutdown: hand every reserved message back. If the connection is already
        gone the records stay, and the next sweep of another worker returns them once this
        channel's heartbeat has stopped."""
        if getattr(self.channel.connection, "client", None) is None:
            logger.warning("connection lost before %d reserved messages could be handed "
                           "back: they return once this consumer's heartbeat stops",
                           len(self._delivered or {}))
            return
        with self.channel.conn_or_acquire(client) as client:
            delivered: dict[str, Any] = self._delivered or {}
            for tag in delivered:
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
            _unprefixed(client, "ZADD", consumers, now, self.channel.consumer_id)
            dead = _unprefixed(client, "ZRANGEBYSCORE", consumers, "-inf", f"({bound}",
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
        """Return a message to its queue from a live worker: not a delivery without outcome."""
        config = self.channel.delivery_config
        prefix = self.channel.global_keyprefix or ""
        with self.channel.conn_or_acquire(client) as client:
            with client.pipeline() as pipe:
                _unprefixed_in_pipe(
                    pipe, "HINCRBY", prefix + config.deliveries_key, delivery_tag, -1)
                _unprefixed_in_pipe(
                    pipe, "HDEL", prefix + config.owner_key, delivery_tag)
                _unprefixed_in_pipe(
                    pipe, "HDEL", prefix + config.held_key(self.channel.consumer_id),
                    delivery_tag)
                pipe.execute()
            self.restore_by_tag(delivery_tag, client=client, leftmost=leftmost)


class ReliableFetchChannel:
    """Mixin for kombu's Redis channel: claim-then-wait instead of BRPOP (see module doc).

    It reuses kombu's single blocking connection and event-loop plumbing: the "BRPOP"
    handler slot now reads either a claim reply or a wake-up.
    """

    QoS = ClaimAwareQoS

    _claim_next = True
    _claim_in_flight = False
    _claim_command: list[Any] | None = None
    no_ack_consumers: set[str] | None = None

    # Attributes of kombu's Redis Channel this mixin builds on.
    client: Any
    connection: Any
    priority_steps: list[int]
    brpop_timeout: float
    global_keyprefix: str
    unacked_key: str
    unacked_index_key: str
    sep: str
    ack_emulation: bool
    _queue_cycle: Any
    _in_poll: Any
    _brpop_sent_at: float | None
    _expires: dict[str, int]
    ResponseError: type[Exception]
    connection_errors: tuple[type[BaseException], ...]

    _dirty: set[str]
    _consumed: dict[str, str]
    _rescan_at = 0.0
    _keyevents: bool | None = None

    # --- publishing: push and index in one step ------------------------------------------

    def _option(self, name: str, default: Any) -> Any:
        options = getattr(self.connection.client, "transport_options", None) or {}
        return options.get(name, default)

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        pri = self._get_message_priority(message, reverse=False)  # type: ignore[attr-defined]
        key = self._q_for_pri(queue, pri)  # type: ignore[attr-defined]
        expires = self._expires.get(queue) if self._expires else None
        batch = kwargs.pop("_publish_batch", None)
        keys, args = self._publish_args(queue, key, dumps(message), front=False)
        if batch is not None:
            # A batch is one non-transactional pipeline: EVAL carries its own source, so a
            # flushed script cache cannot fail it.
            batch.add("eval", PUBLISH.source, len(keys), *keys, *args)
            for pri_step in self.priority_steps if expires is not None else ():
                batch.add("pexpire", self._q_for_pri(queue, pri_step), expires)  # type: ignore[attr-defined]
            return
        with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
            run_script(client, PUBLISH, keys, args)
            if expires is not None:
                with client.pipeline(transaction=False) as pipe:
                    for pri_step in self.priority_steps:
                        pipe.pexpire(self._q_for_pri(queue, pri_step), expires)  # type: ignore[attr-defined]
                    pipe.execute()

    def _publish_args(self, queue: str, key: str, payload: str,
                      *, front: bool) -> tuple[list[str], list[Any]]:
        prefix = self.global_keyprefix or ""
        config = self.delivery_config
        return ([prefix + key, prefix + config.waiters_key(queue)],
                [payload, "R" if front else "L", prefix + config.ready_prefix,
                 prefix + config.wake_prefix, config.wake_depth])

    def _do_restore_message(self, payload: Any, exchange: Any, routing_key: Any,
                            pipe: Any, leftmost: bool = False) -> None:
        """Requeued messages (restore sweep, reject with requeue) are indexed as ready in the
        same transaction as their push (the groups are read just before it)."""
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)  # type: ignore[misc]
        try:
            queues = self._lookup(exchange, routing_key)  # type: ignore[attr-defined]
            pri = self._get_message_priority(payload, reverse=False)  # type: ignore[attr-defined]
        except Exception:  # restoring must not fail on the index; a rescan finds it
            return
        prefix = self.global_keyprefix or ""
        config = self.delivery_config
        for queue in queues:
            key = prefix + self._q_for_pri(queue, pri)  # type: ignore[attr-defined]
            with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
                groups = _unprefixed(client, "SMEMBERS", prefix + config.waiters_key(queue))
            for raw in groups or ():
                group = bytes_to_str(raw)
                _unprefixed_in_pipe(pipe, "ZADD", prefix + config.ready_prefix + group, "NX",
                                    time() * 1000 + pri * 1e14, key)
                _unprefixed_in_pipe(pipe, "LPUSH", prefix + config.wake_prefix + group, 1)

    # --- the group's queues: what this consumer serves, registered for the index ----------

    @property
    def group(self) -> str:
        """The worker group: workers started with the same plugin selector share one ready
        index and one wake-up list; without one, each consumer is its own group."""
        return self.delivery_config.group or self.consumer_id

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        """Register the queue for the ready index; remember consumers that do not
        acknowledge: their claims record nothing, so no second write (which a dead
        connection can break) follows the claim."""
        tag = super().basic_consume(queue, no_ack, *args, **kwargs)  # type: ignore[misc]
        self.__dict__.pop("_active_cache", None)
        consumer_tag = args[1] if len(args) > 1 else kwargs.get("consumer_tag")
        if no_ack and consumer_tag is not None:
            if self.no_ack_consumers is None:
                self.no_ack_consumers = set()
            self.no_ack_consumers.add(consumer_tag)
        if queue not in getattr(self, "_fanout_queues", {}):
            self._register_queue(queue)
        return tag

    def basic_cancel(self, consumer_tag: Any) -> Any:
        if self.no_ack_consumers:
            self.no_ack_consumers.discard(consumer_tag)
        queue = getattr(self, "_tag_to_queue", {}).get(consumer_tag)
        result = super().basic_cancel(consumer_tag)  # type: ignore[misc]
        self.__dict__.pop("_active_cache", None)
        if queue is not None and queue not in self.active_queues:
            self._unregister_queue(queue)
        return result

    @property
    def active_queues(self) -> list[str]:
        """kombu's list of consumed (non-fanout) queues, kept between changes: kombu
        rebuilds it on every event-loop tick, a cost that grows with the plugin count."""
        cached: list[str] | None = self.__dict__.get("_active_cache")
        if cached is None:
            fanout = self.active_fanout_queues  # type: ignore[attr-defined]
            cached = list(dict.fromkeys(
                queue for queue in self._active_queues  # type: ignore[attr-defined]
                if queue not in fanout))
            self.__dict__["_active_cache"] = cached
        return cached

    def _update_queue_cycle(self) -> None:
        """kombu's round-robin cycle over queues is not used: the ready index orders the
        queues (rebuilding the cycle at each consume made starting on 10,000 queues
        quadratic)."""
        if not self.ack_emulation:
            super()._update_queue_cycle()  # type: ignore[misc]

    def _list_keys(self, queue: str) -> list[str]:
        prefix = self.global_keyprefix or ""
        return [prefix + self._q_for_pri(queue, pri)  # type: ignore[attr-defined]
                for pri in self.priority_steps]

    def _register_queue(self, queue: str) -> None:
        """Join the queue's waiters, add its lists to this consumer's set and index them."""
        if not self.ack_emulation:
            return
        prefix = self.global_keyprefix or ""
        config = self.delivery_config
        consumed = self.__dict__.setdefault("_consumed", {})
        waiters = prefix + config.waiters_key(queue)
        lists = self._list_keys(queue)
        consumed.update(dict.fromkeys(lists, waiters))
        self.__dict__.setdefault("_dirty", set()).update(lists)
        with self.conn_or_acquire() as client, client.pipeline() as pipe:  # type: ignore[attr-defined]
            _unprefixed_in_pipe(pipe, "SADD", prefix + config.consumes_key(self.consumer_id),
                                *lists)
            _unprefixed_in_pipe(pipe, "SADD", waiters, self.group)
            # Wake this group's wait, so the new queue's backlog is indexed and claimed now.
            _unprefixed_in_pipe(pipe, "LPUSH", self._wake_key(), 1)
            pipe.execute()
        self._claim_next = True

    def _unregister_queue(self, queue: str) -> None:
        prefix = self.global_keyprefix or ""
        config = self.delivery_config
        lists = self._list_keys(queue)
        consumed = self.__dict__.setdefault("_consumed", {})
        for key in lists:
            consumed.pop(key, None)
        with self.conn_or_acquire() as client, client.pipeline() as pipe:  # type: ignore[attr-defined]
            _unprefixed_in_pipe(pipe, "SREM", prefix + config.consumes_key(self.consumer_id),
                                *lists)
            if self.group == self.consumer_id:
                _unprefixed_in_pipe(pipe, "SREM", prefix + config.waiters_key(queue),
                                    self.group)
            pipe.execute()

    def _ready_key(self) -> str:
        return (self.global_keyprefix or "") + self.delivery_config.ready_prefix + self.group

    def _wake_key(self) -> str:
        return (self.global_keyprefix or "") + self.delivery_config.wake_prefix + self.group

    # --- keyspace notifications: messages from producers that do not index them ---------

    def _keyevents_on(self) -> bool:
        """Whether list-push keyspace events reach us; enabled on the server if it allows.
        Probed once per channel; False means the rescans alone find unindexed messages."""
        if self._keyevents is not None:
            return self._keyevents
        self._keyevents = False
        if not self.delivery_config.keyspace_events:
            return False
        try:
            with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
                reply = _unprefixed(client, "CONFIG", "GET", "notify-keyspace-events")
                values = {bytes_to_str(k): bytes_to_str(v) for k, v in dict(reply).items()}
                current = values.get("notify-keyspace-events", "")
                wanted = "".join(flag for flag in "El" if flag not in current
                                 and not (flag == "l" and "A" in current))
                if wanted:
                    _unprefixed(client, "CONFIG", "SET", "notify-keyspace-events",
                                current + wanted)
            self._keyevents = True
        except (self.ResponseError, TypeError, ValueError) as exc:
            logger.warning("Redis keyspace notifications are unavailable (%s): messages from "
                           "producers that do not go through pluginpool are found by rescans "
                           "only", exc)
        return self._keyevents

    def _keyevent_channels(self) -> list[str]:
        db = self.client.connection_pool.connection_kwargs.get("db", 0)
        return [f"__keyevent@{db}__:{event}" for event in KEYEVENT_CHANNELS]

    def _subscribe(self) -> None:
        """kombu listens only on channels with fanout queues (Celery's remote control), not
        on the channel that consumes task queues: subscribe there, and hand each event to
        every channel of the connection (`_handle_message`)."""
        super()._subscribe()  # type: ignore[misc]
        if getattr(self, "_in_listen", None) and self._keyevents_on():
            self.subclient.subscribe(*self._keyevent_channels())  # type: ignore[attr-defined]

    def _handle_message(self, client: Any, r: Any) -> Any:
        if (bytes_to_str(r[0]) == "message"
                and bytes_to_str(r[1]).startswith("__keyevent@")):
            key = bytes_to_str(r[2])
            for channel in getattr(self.connection, "channels", None) or (self,):
                if isinstance(channel, ReliableFetchChannel):
                    channel._on_list_push(key)
            return {"type": b"keyevent", "pattern": None, "channel": r[1], "data": None}
        return super()._handle_message(client, r)  # type: ignore[misc]

    def _on_list_push(self, key: str) -> None:
        """A message was pushed on `key`: index it at the next claim, or now if idle."""
        consumed: dict[str, str] = self.__dict__.get("_consumed", {})
        if key not in consumed:
            return
        if self._claim_in_flight or self._in_poll is None:
            self.__dict__.setdefault("_dirty", set()).add(key)
            return
        config = self.delivery_config
        prefix = self.global_keyprefix or ""
        with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
            run_script(client, INDEX, [key, consumed[key]],
                       [prefix + config.ready_prefix, prefix + config.wake_prefix,
                        config.wake_depth])

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
            prefix = self.global_keyprefix or ""
            consumed: dict[str, str] = self.__dict__.setdefault("_consumed", {})
            dirty: set[str] = self.__dict__.setdefault("_dirty", set())
            if monotonic() >= self._rescan_at:
                dirty.update(consumed)
                self._rescan_at = monotonic() + (
                    config.rescan_s if self._keyevents_on() else 0.0)
            pairs = [part for key in dirty if key in consumed for part in (key, consumed[key])]
            dirty.clear()
            keys = [*self.record_keys()[:5], prefix + config.dead_letter_key,
                    prefix + config.dead_letter_index_key, prefix + config.consumers_key,
                    self._ready_key(), prefix + config.consumes_key(self.consumer_id), *pairs]
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
                timeout = (self.brpop_timeout if self._keyevents_on()
                           else self._option(IDLE_WAIT_OPTION, self.brpop_timeout))
            command = ["BLPOP", self._wake_key(), timeout or 0]
        self._claim_in_flight = self._claim_next
        self._claim_command = command if self._claim_next else None
        self._in_poll = self.client.connection
        self._brpop_sent_at = self._health_clock(0 if self._claim_next else timeout or 0)
        self.client.connection.send_command(*command)

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
                return _unprefixed(self.client, "EVAL", CLAIM.source, *command[2:])
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

    @cached_property
    def consumer_id(self) -> str:
        return new_consumer_id()

    @cached_property
    def delivery_config(self) -> DeliveryConfig:
        return DeliveryConfig.from_option(self._option(DELIVERY_OPTION, None))

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
