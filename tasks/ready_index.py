"""The ready index side of pluginpool's Redis channel: publishing, the worker group's
queues, and keyspace notifications.

Each worker group (the workers started with the same plugin selector; without one, each
consumer alone) has a ready index, a sorted set of the queue lists that may hold messages
in the order the group serves them, and one wake-up list. A publish pushes the message and
indexes its queue for every group consuming it in one atomic step (`publish.lua`); a
consumer registers its queues (its consumed-lists set, the queues' waiters sets) as it
starts consuming them; pushes by producers that do not index (plain kombu or Celery) are
reported by Redis keyspace notifications where the server allows them, and found by
rescans otherwise. `reliable_fetch` claims from the index.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from time import time
from typing import Any

from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps

from pluginpool.tasks.delivery_record import (
    DELIVERY_OPTION,
    INDEX,
    PUBLISH,
    DeliveryConfig,
    new_consumer_id,
    run_script,
    unprefixed,
    unprefixed_in_pipe,
)
from pluginpool.tasks.submit_step import take as take_submit_step

logger = logging.getLogger("pluginpool.transport")

REGISTER_CHUNK = 1_000
"""Members per SADD when a consumer's whole registration is written at once."""


def sadd_chunked(pipe: Any, key: str, members: list[str]) -> None:
    """SADD `members` to `key` in the pipeline, REGISTER_CHUNK members per command."""
    for start in range(0, len(members), REGISTER_CHUNK):
        unprefixed_in_pipe(pipe, "SADD", key, *members[start:start + REGISTER_CHUNK])


def ring(pipe: Any, wake_key: str, depth: int) -> None:
    """Ring a group's wake-up list in the pipeline, bounded as publish.lua bounds it (one
    ring per queue added while running would otherwise pile up into as many empty
    claims)."""
    unprefixed_in_pipe(pipe, "LPUSH", wake_key, 1)
    unprefixed_in_pipe(pipe, "LTRIM", wake_key, 0, depth - 1)


KEYEVENT_CHANNELS = ("lpush", "rpush")
"""Keyspace events that put a message on a list (Redis `notify-keyspace-events` E + l)."""


class ReadyIndexChannel:
    """Mixin for kombu's Redis channel (see module doc); `ReliableFetchChannel` builds on it."""

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
    _in_poll: Any
    _brpop_sent_at: float | None
    _expires: dict[str, int]
    ResponseError: type[Exception]
    connection_errors: tuple[type[BaseException], ...]

    _dirty: set[str]
    _consumed: dict[str, str]
    _rescan_at = 0.0
    _slice_at = 0.0
    _slice_cursor = 0
    _keyevents: bool | None = None
    _keyevents_conn: Any = None
    """The LISTEN connection the keyevent subscription was made on (kombu's `_in_listen`)."""

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """kombu's, with one client object per connection pool instead of a new one per
        call: building a redis-py client (its table of ~300 reply callbacks) cost 0.28 ms,
        twice per job at the producer and again at every ack. A client over a pool is safe
        to share between threads (each command takes a connection of the pool)."""
        if client is not None:
            yield client
            return
        pool = self.pool  # type: ignore[attr-defined]
        shared: tuple[Any, Any] | None = self.__dict__.get("_shared_client")
        if shared is None or shared[0] is not pool:
            shared = (pool, self._create_client())  # type: ignore[attr-defined]
            self.__dict__["_shared_client"] = shared
        yield shared[1]

    # --- publishing: push and index in one step ------------------------------------------

    def _option(self, name: str, default: Any) -> Any:
        options = getattr(self.connection.client, "transport_options", None) or {}
        return options.get(name, default)

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        pri = self._get_message_priority(message, reverse=False)  # type: ignore[attr-defined]
        key = self._q_for_pri(queue, pri)  # type: ignore[attr-defined]
        expires = self._expires.get(queue) if self._expires else None
        batch = kwargs.pop("_publish_batch", None)
        step, message = take_submit_step(message)  # a plugin job's submit (submit_step.py)
        keys, args = self._publish_args(queue, key, dumps(message), front=False)
        if step is not None:
            keys = keys + step.script_keys()
            args = args + step.script_args(broker_prefix=self.global_keyprefix or "")
        if batch is not None and step is None:
            # A batch is one non-transactional pipeline: EVAL carries its own source, so a
            # flushed script cache cannot fail it. A plugin job's submit is not batched: its
            # refusal (a paused plugin) must reach its caller, which a batch's flush cannot
            # tell apart.
            batch.add("eval", PUBLISH.source, len(keys), *keys, *args)
            for pri_step in self.priority_steps if expires is not None else ():
                batch.add("pexpire", self._q_for_pri(queue, pri_step), expires)  # type: ignore[attr-defined]
            return
        with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
            reply = run_script(client, PUBLISH, keys, args)
            if step is not None:
                step.check(reply)  # PluginDisabledError: refused, nothing pushed
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
                groups = unprefixed(client, "SMEMBERS", prefix + config.waiters_key(queue))
            for raw in groups or ():
                group = bytes_to_str(raw)
                unprefixed_in_pipe(pipe, "ZADD", prefix + config.ready_prefix + group, "NX",
                                    time() * 1000 + pri * 1e14, key)
                ring(pipe, prefix + config.wake_prefix + group, config.wake_depth)

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
        if (queue is not None and queue not in self.active_queues
                and not getattr(self, "closed", False)):
            # A closing channel (a warm shutdown, a lost connection: its transport may be
            # torn down) leaves its registration to the rescue once its heartbeat stops.
            try:
                self._unregister_queue(queue)
            except self.connection_errors as exc:
                logger.warning("could not unregister %s from the ready index: %r", queue, exc)
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
        """Join the queue's waiters, add its lists to this consumer's set and index them.

        At start (before this channel's first claim) registrations are gathered and written
        in a few pipelines (`flush_registrations`): one round trip per queue made a start on
        10,000 queues seconds longer. Afterwards (a plugin added while running) each is
        written at once and wakes the group's wait."""
        if not self.ack_emulation:
            return
        prefix = self.global_keyprefix or ""
        consumed = self.__dict__.setdefault("_consumed", {})
        lists = self._list_keys(queue)
        consumed.update(dict.fromkeys(lists, prefix + self.delivery_config.waiters_key(queue)))
        self.__dict__.pop("_rescan_order", None)  # the rolling rescan's order, rebuilt
        self.__dict__.setdefault("_dirty", set()).update(lists)
        pending: list[str] = self.__dict__.setdefault("_pending_registration", [])
        pending.append(queue)
        if self.__dict__.get("_claimed_once") or len(pending) >= REGISTER_CHUNK:
            self.flush_registrations()
        self._claim_next = True

    def flush_registrations(self) -> None:
        """Write the gathered registrations: the lists into this consumer's set, the group
        into each queue's waiters, a heartbeat (a start on 10,000 queues takes longer than
        `consumer_dead_after_s`: a live consumer must not declare this one dead meanwhile)
        and a ring of the group's wake-up list, so a new queue's backlog is claimed now."""
        pending: list[str] = self.__dict__.get("_pending_registration") or []
        if not pending:
            return
        self.__dict__["_pending_registration"] = []
        prefix = self.global_keyprefix or ""
        config = self.delivery_config
        lists = [key for queue in pending for key in self._list_keys(queue)]
        with self.conn_or_acquire() as client, client.pipeline() as pipe:  # type: ignore[attr-defined]
            sadd_chunked(pipe, prefix + config.consumes_key(self.consumer_id), lists)
            for queue in pending:
                unprefixed_in_pipe(pipe, "SADD", prefix + config.waiters_key(queue), self.group)
            unprefixed_in_pipe(pipe, "ZADD", prefix + config.consumers_key, time(),
                                self.consumer_id)
            ring(pipe, self._wake_key(), config.wake_depth)
            pipe.execute()

    def reregister_if_declared_dead(self, client: Any) -> None:
        """Put this consumer's registration back when Redis no longer holds all of it.

        A consumer declared dead (its heartbeat stopped: paused past the bound, or a start
        longer than `consumer_dead_after_s` between kombu's first sweep at connect and the
        event loop, as with 10,000 plugins) loses its consumed-lists set to its rescuer. If
        that happened while it was still registering its queues, the later registrations
        re-created part of the set: its claims then deferred the rest as someone else's,
        and their jobs waited for ever. So the check is the set's size against what this
        consumer consumes (one SCARD a sweep), and the repair rewrites the whole set in one
        transaction, with the waiters, and rescans."""
        consumed: dict[str, str] = self.__dict__.get("_consumed", {})
        if not consumed:
            return
        self.flush_registrations()
        prefix = self.global_keyprefix or ""
        key = prefix + self.delivery_config.consumes_key(self.consumer_id)
        held = int(unprefixed(client, "SCARD", key))
        if held == len(consumed):
            return
        logger.warning("this consumer's registration in Redis holds %d of its %d queue lists "
                       "(it was declared dead: its heartbeat stopped for longer than the "
                       "bound, and what it held ran elsewhere): registering its queues again",
                       held, len(consumed))
        with client.pipeline() as pipe:  # MULTI: no claim sees the set half rewritten
            unprefixed_in_pipe(pipe, "DEL", key)
            sadd_chunked(pipe, key, list(consumed))
            for waiters in set(consumed.values()):
                unprefixed_in_pipe(pipe, "SADD", waiters, self.group)
            pipe.execute()
        self._rescan_at = 0.0
        self._claim_next = True

    def _unregister_queue(self, queue: str) -> None:
        self.flush_registrations()  # in order: a gathered registration is written first
        prefix = self.global_keyprefix or ""
        config = self.delivery_config
        lists = self._list_keys(queue)
        consumed = self.__dict__.setdefault("_consumed", {})
        for key in lists:
            consumed.pop(key, None)
        self.__dict__.pop("_rescan_order", None)
        with self.conn_or_acquire() as client, client.pipeline() as pipe:  # type: ignore[attr-defined]
            unprefixed_in_pipe(pipe, "SREM", prefix + config.consumes_key(self.consumer_id),
                                *lists)
            if self.group == self.consumer_id:
                unprefixed_in_pipe(pipe, "SREM", prefix + config.waiters_key(queue),
                                    self.group)
            pipe.execute()

    def withdraw_queue(self, queue: str) -> None:
        """The whole group stops serving `queue` (its plugin disabled or unregistered: every
        member follows the same registry with the same selector), so it leaves the group's
        waiters and ready index: no publish or claim of the group meets it again until a
        member consumes it again (`_register_queue` joins and rescans it). Left there, its
        waiting jobs made every idle claim of every member read past it."""
        if not self.ack_emulation:
            return
        prefix = self.global_keyprefix or ""
        with self.conn_or_acquire() as client, client.pipeline() as pipe:  # type: ignore[attr-defined]
            unprefixed_in_pipe(pipe, "SREM", prefix + self.delivery_config.waiters_key(queue),
                                self.group)
            unprefixed_in_pipe(pipe, "ZREM", self._ready_key(), *self._list_keys(queue))
            pipe.execute()

    def _ready_key(self) -> str:
        return (self.global_keyprefix or "") + self.delivery_config.ready_prefix + self.group

    def _wake_key(self) -> str:
        return (self.global_keyprefix or "") + self.delivery_config.wake_prefix + self.group

    # --- keyspace notifications: messages from producers that do not index them ---------

    def _keyevents_on(self) -> bool:
        """Whether the server sends list-push keyspace events (enabled there if it allows;
        whether they reach this connection is `_keyevents_heard`). Probed once per channel;
        False means the rescans alone find unindexed messages."""
        if self._keyevents is not None:
            return self._keyevents
        self._keyevents = False
        if not self.delivery_config.keyspace_events:
            return False
        try:
            with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
                reply = unprefixed(client, "CONFIG", "GET", "notify-keyspace-events")
                values = {bytes_to_str(k): bytes_to_str(v) for k, v in dict(reply).items()}
                current = values.get("notify-keyspace-events", "")
                wanted = "".join(flag for flag in "El" if flag not in current
                                 and not (flag == "l" and "A" in current))
                if wanted:
                    unprefixed(client, "CONFIG", "SET", "notify-keyspace-events",
                                current + wanted)
            self._keyevents = True
        except (self.ResponseError, TypeError, ValueError) as exc:
            logger.warning("Redis keyspace notifications are unavailable (%s): messages from "
                           "producers that do not go through pluginpool are found by rescans "
                           "only", exc)
        return self._keyevents

    def _keyevents_heard(self) -> bool:
        """Whether list-push events reach this connection now: a channel of it is listening
        with the subscription `_subscribe` made. The server allowing them is not enough: a
        connection without a broadcast consumer (a producer waiting on a reply queue, a
        worker without remote control) never subscribes, and must rescan after each idle
        wait rather than sleep through the long one."""
        if self.global_keyprefix or not self._keyevents_on():
            return False
        for channel in getattr(self.connection, "channels", None) or (self,):
            listening = getattr(channel, "_in_listen", None)
            if (listening and listening is getattr(channel, "_keyevents_conn", None)
                    and not getattr(channel, "closed", False)):
                return True
        return False

    def _keyevent_channels(self) -> list[str]:
        db = self.client.connection_pool.connection_kwargs.get("db", 0)
        return [f"__keyevent@{db}__:{event}" for event in KEYEVENT_CHANNELS]

    def _subscribe(self) -> None:
        """kombu listens only on channels with fanout queues (Celery's remote control), not
        on the channel that consumes task queues: subscribe there, and hand each event to
        every channel of the connection (`_handle_message`)."""
        super()._subscribe()  # type: ignore[misc]
        # kombu's prefixed pub/sub client would prefix the keyevent channels too (Redis
        # never publishes there): with a global_keyprefix the rescans alone find pushes.
        if (getattr(self, "_in_listen", None) and not self.global_keyprefix
                and self._keyevents_on()):
            self.subclient.subscribe(*self._keyevent_channels())  # type: ignore[attr-defined]
            self._keyevents_conn = getattr(self, "_in_listen", None)
            # Pub/sub keeps nothing while unsubscribed: what was pushed before this
            # (re)subscribe is found by a full rescan at the next claim.
            for channel in getattr(self.connection, "channels", None) or (self,):
                if isinstance(channel, ReadyIndexChannel):
                    channel._rescan_at = 0.0

    def _handle_message(self, client: Any, r: Any) -> Any:
        if (bytes_to_str(r[0]) == "message"
                and bytes_to_str(r[1]).startswith("__keyevent@")):
            key = bytes_to_str(r[2])
            for channel in getattr(self.connection, "channels", None) or (self,):
                if isinstance(channel, ReadyIndexChannel):
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

    @cached_property
    def consumer_id(self) -> str:
        return new_consumer_id()

    @cached_property
    def delivery_config(self) -> DeliveryConfig:
        return DeliveryConfig.from_option(self._option(DELIVERY_OPTION, None))
