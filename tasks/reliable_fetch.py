"""Reliable fetch for kombu's Redis transport: no instant where a message can be lost.

kombu consumes with `BRPOP` and then, from the worker, records the message in its unacked
hash. A worker SIGKILLed between the two loses that message for good (seen in the chaos
test: 1 job in 2,000). Redis has no blocking pop over several lists that also records the
message somewhere, so this channel splits consuming in two:

- **claim**: `claim.lua` pops the next message of the worker's queues and records it as
  unacked in one atomic script. A worker that dies after it leaves the message in the
  unacked hash, from which kombu's restore sweep (on any worker) requeues it once the
  visibility timeout has passed. Claims repeat while they find messages.
- **wait**: when every queue is empty, the worker blocks on `BLPOP` over one small *bell*
  list per queue. Every publish through this transport pushes a token on the bell in the
  same round trip as the message. A bell token carries no job, so losing one loses
  nothing; the wait also ends after the idle wait (`pluginpool_idle_wait_s`, else kombu's
  `brpop_timeout`), so messages published by a producer that rings no bell (plain kombu
  or Celery) still start within that time on an idle worker.

This is the "reliable queue" pattern (Redis `LMOVE` docs; Sidekiq Pro's super_fetch),
written here because kombu has no such mode and `BLMOVE` takes a single source list.
"""

from __future__ import annotations

import hashlib
import logging
from importlib import resources
from queue import Empty
from time import monotonic, time
from typing import Any

from kombu.transport import virtual
from kombu.transport.redis import QoS as RedisQoS
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.exceptions import NoScriptError

logger = logging.getLogger("pluginpool.transport")

BELL_PREFIX_OPTION = "pluginpool_bell_prefix"
IDLE_WAIT_OPTION = "pluginpool_idle_wait_s"
DEFAULT_BELL_PREFIX = "pluginpool:bell:"
BELL_DEPTH = 64
"""Tokens kept on a bell nobody waits on: enough to wake every idle worker of a queue
after a burst; extra tokens only cost an empty claim each."""

CLAIM_SOURCE = resources.files("pluginpool.tasks").joinpath("claim.lua").read_text()
CLAIM_SHA = hashlib.sha1(CLAIM_SOURCE.encode()).hexdigest()


class ClaimAwareQoS(RedisQoS):
    """kombu's QoS, minus the Redis write for messages `claim.lua` already recorded."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        claimed: set[str] = self.channel.connection.__dict__.setdefault("claimed_tags", set())
        if delivery_tag in claimed:
            claimed.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)


class ReliableFetchChannel:
    """Mixin for kombu's Redis channel: claim-then-wait instead of BRPOP (see module doc).

    It reuses kombu's single blocking connection and event-loop plumbing: the "BRPOP"
    handler slot now reads either a claim reply or a bell wake-up.
    """

    QoS = ClaimAwareQoS

    _claim_next = True
    _claim_in_flight = False

    # Attributes of kombu's Redis Channel this mixin builds on.
    client: Any
    connection: Any
    active_queues: Any
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

    # --- publishing: ring the queue's bell in the message's round trip -------------------

    def _option(self, name: str, default: Any) -> Any:
        options = getattr(self.connection.client, "transport_options", None) or {}
        return options.get(name, default)

    def bell_key(self, queue: str) -> str:
        return f"{self._option(BELL_PREFIX_OPTION, DEFAULT_BELL_PREFIX)}{queue}"

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        pri = self._get_message_priority(message, reverse=False)  # type: ignore[attr-defined]
        key = self._q_for_pri(queue, pri)  # type: ignore[attr-defined]
        expires = self._expires.get(queue) if self._expires else None
        batch = kwargs.pop("_publish_batch", None)
        commands: list[tuple[str, tuple[Any, ...]]] = [("lpush", (key, dumps(message)))]
        commands += self._ring_commands(queue)
        if expires is not None:
            commands += [("pexpire", (self._q_for_pri(queue, p), expires))  # type: ignore[attr-defined]
                         for p in self.priority_steps]
        if batch is not None:
            for name, args in commands:
                batch.add(name, *args)
            return
        with (self.conn_or_acquire() as client,  # type: ignore[attr-defined]
              client.pipeline(transaction=False) as pipe):
            for name, args in commands:
                getattr(pipe, name)(*args)
            pipe.execute()

    def _ring_commands(self, queue: str) -> list[tuple[str, tuple[Any, ...]]]:
        bell = self.bell_key(queue)
        # LPUSH is prefixed by kombu's key-prefixing client, LTRIM is not.
        return [("lpush", (bell, 1)),
                ("ltrim", ((self.global_keyprefix or "") + bell, 0, BELL_DEPTH - 1))]

    def _do_restore_message(self, payload: Any, exchange: Any, routing_key: Any,
                            pipe: Any, leftmost: bool = False) -> None:
        """Requeued messages (restore sweep, reject with requeue) ring the bell too."""
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)  # type: ignore[misc]
        try:
            queues = self._lookup(exchange, routing_key)  # type: ignore[attr-defined]
        except Exception:  # restoring must not fail on the wake-up; the wait times out
            return
        for queue in queues:
            for name, args in self._ring_commands(queue):
                getattr(pipe, name)(*args)

    # --- consuming: claim while there is work, wait on the bells when there is none ------

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self.ack_emulation:
            super()._brpop_start(timeout)  # type: ignore[misc]
            return
        if timeout is None:
            timeout = self._option(IDLE_WAIT_OPTION, self.brpop_timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        prefix = self.global_keyprefix or ""
        if self._claim_next:
            keys = [prefix + self.unacked_key, prefix + self.unacked_index_key]
            keys += [prefix + self._q_for_pri(queue, pri)  # type: ignore[attr-defined]
                     for pri in self.priority_steps for queue in queues]
            command: list[Any] = ["EVALSHA", CLAIM_SHA, len(keys), *keys, repr(time())]
        else:
            command = ["BLPOP", *[prefix + self.bell_key(queue) for queue in queues],
                       timeout or 0]
        self._claim_in_flight = self._claim_next
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self.client.connection.send_command(*command)

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
                raise
            except self.ResponseError as exc:
                self._claim_failed(exc)
                raise Empty() from None
            if not claiming:
                self._claim_next = True  # a bell rang, or the wait timed out: look again
                raise Empty()
            if not reply:
                self._claim_next = False  # every queue is empty: wait on the bells
                raise Empty()
            key, item, registered = reply
            self._deliver_claimed(bytes_to_str(key), item, bool(int(registered)))
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()  # type: ignore[attr-defined]

    def _claim_failed(self, exc: Exception) -> None:
        if isinstance(exc, NoScriptError) or "NOSCRIPT" in str(exc):
            # Redis restarted or its script cache was flushed: load and claim again.
            self.client.script_load(CLAIM_SOURCE)
            self._claim_next = True
            return
        # E.g. WRONGTYPE: someone replaced a queue with a non-list. Keep the worker alive,
        # say why, and try again after a wait.
        logger.error("claiming from the broker failed: %s", exc)
        self._claim_next = False

    def _deliver_claimed(self, key: str, item: bytes, registered: bool) -> None:
        prefix = self.global_keyprefix or ""
        queue = key[len(prefix):] if prefix and key.startswith(prefix) else key
        queue = queue.rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(queue)
        transport: Any = self.connection
        try:
            text = bytes_to_str(item)
        except UnicodeDecodeError as exc:
            transport.dead_letter(self, repr(exc.object[:200]), reason="not UTF-8", queue=queue)
            return
        try:
            message = loads(text)
        except ValueError as exc:
            transport.dead_letter(self, text, reason=f"not JSON: {exc}", queue=queue)
            return
        if not registered:
            transport._deliver(message, queue)
            return
        tag = message["properties"]["delivery_tag"]
        claimed: set[str] = transport.__dict__.setdefault("claimed_tags", set())
        claimed.add(tag)
        try:
            transport._deliver(message, queue)
        except BaseException:
            # Delivery broke off: keep the unacked record, so the restore sweep returns
            # the message after the visibility timeout instead of it being lost.
            claimed.discard(tag)
            raise
        if tag in claimed:
            # Not taken into QoS (dead-lettered as malformed): drop the unacked record
            # claim.lua wrote, or the restore sweep would bring it back forever.
            claimed.discard(tag)
            self.qos._remove_from_indices(tag).execute()  # type: ignore[attr-defined]
