"""The dead-letter store: messages set aside instead of delivered, for operators.

Written by the worker's transport (`reliable_fetch`, `claim.lua`): items the decode
boundary refused and messages the poison rule quarantined. Read, requeued and discarded
here, by the client, the CLI (`pluginpool deadletter`) and the HTTP API.
"""

from __future__ import annotations

import json
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict

from pluginpool.policy.errors import DeadLetterNotFoundError, DeadLetterNotRequeueableError
from pluginpool.policy.keys import RedisKeys
from pluginpool.tasks.delivery_record import PUBLISH, DeliveryConfig

PRIORITY_SEPARATOR = "\x06\x16"
"""kombu's separator between a queue's name and its priority step in a list key."""


class DeadLetter(BaseModel):
    """One message set aside, with why and its delivery history."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    reason: str
    queue: str | None = None
    raw: str = ""
    requeueable: bool = False
    first_seen: float
    at: float
    deliveries: int = 0
    last_consumer: str | None = None

    def summary(self) -> dict[str, Any]:
        """Everything but the raw message (which may be a megabyte)."""
        return self.model_dump(exclude={"raw"}) | {"raw_bytes": len(self.raw.encode())}


class DeadLetterStore:
    """Operator access to the dead-letter hash and its time index."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self._redis = client
        self._keys = keys

    def count(self) -> int:
        return int(self._redis.zcard(self._keys.dead_letter_index))

    def list(self, *, limit: int = 100, offset: int = 0) -> list[DeadLetter]:
        """Newest first."""
        ids: list[bytes] = self._redis.zrevrange(  # type: ignore[assignment]
            self._keys.dead_letter_index, offset, offset + limit - 1)
        if not ids:
            return []
        raws = self._redis.hmget(self._keys.dead_letter, ids)
        return [_parse(raw) for raw in raws if raw is not None]

    def get(self, entry_id: str) -> DeadLetter:
        raw = self._redis.hget(self._keys.dead_letter, entry_id)
        if raw is None:
            raise DeadLetterNotFoundError(entry_id)
        return _parse(raw)

    def requeue(self, entry_id: str) -> DeadLetter:
        """Put the message back at the end of its queue with a fresh delivery count."""
        entry = self.get(entry_id)
        if not entry.requeueable or not entry.queue:
            raise DeadLetterNotRequeueableError(entry_id)
        queue_name = queue_of_list(entry.queue)
        # Pushed and indexed as ready in one step, like any publish (publish.lua).
        self._redis.eval(PUBLISH.source, 2, entry.queue, self._keys.waiters_prefix + queue_name,
                         entry.raw, "L", self._keys.ready_prefix, self._keys.wake_prefix,
                         DeliveryConfig().wake_depth)
        with self._redis.pipeline() as pipe:
            pipe.hdel(self._keys.deliveries, entry.id, f"{entry.id}|t")
            pipe.hdel(self._keys.dead_letter, entry_id)
            pipe.zrem(self._keys.dead_letter_index, entry_id)
            pipe.execute()
        return entry

    def discard(self, entry_id: str) -> None:
        with self._redis.pipeline() as pipe:
            pipe.hdel(self._keys.dead_letter, entry_id)
            pipe.zrem(self._keys.dead_letter_index, entry_id)
            removed, _ = pipe.execute()
        if not removed:
            raise DeadLetterNotFoundError(entry_id)

    def discard_all(self) -> int:
        with self._redis.pipeline() as pipe:
            pipe.zcard(self._keys.dead_letter_index)
            pipe.delete(self._keys.dead_letter, self._keys.dead_letter_index)
            count, _ = pipe.execute()
        return int(count)


def _parse(raw: bytes | str) -> DeadLetter:
    return DeadLetter.model_validate(json.loads(raw))


def queue_of_list(key: str) -> str:
    """kombu's priority queues are `<queue>\\x06\\x16<priority>`; bells are per queue."""
    return key.split(PRIORITY_SEPARATOR, 1)[0]


class DeliveryStats(BaseModel):
    """The delivery path's counters, for /metrics and operators."""

    dead_letters: int
    rescued: int
    late_acks: int


def delivery_stats(client: redis.Redis, keys: RedisKeys) -> DeliveryStats:
    """Dead letters waiting; messages returned from dead consumers; late acknowledgements
    (each one a job that ran twice because its first worker was declared dead)."""
    with client.pipeline(transaction=False) as pipe:
        pipe.zcard(keys.dead_letter_index)
        pipe.hmget(keys.delivery_stats, ["rescued", "late_acks"])
        count, (rescued, late) = pipe.execute()
    return DeliveryStats(dead_letters=int(count), rescued=int(rescued or 0),
                         late_acks=int(late or 0))
