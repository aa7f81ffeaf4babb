"""The unacknowledged record of a delivery, and the scripts that keep it.

One record serves poison detection (issue: poison-proof delivery), dead-worker rescue
and acknowledgement. For one delivery tag it is:

- kombu's own unacked hash entry and index score, so kombu's restore sweep still
  returns a message whose holder vanished once the visibility timeout has passed;
- the delivery count without an outcome and the first delivery's time (`deliveries`);
- the consumer (worker process) holding it (`owner`) and that consumer's `held` hash
  (tag → queue), from which any live worker returns it once the consumer's heartbeat
  (`consumers`, written at every restore sweep) is older than `dead_after_s`.

`claim.lua` writes the whole record atomically with the pop; `ack.lua` drops it (or
counts a late acknowledgement from a consumer that was declared dead); `deadletter.lua`
sets a message aside and drops its record in one step; `rescue.lua` returns all that a
dead consumer held to the front of its queues, once; `handback.lua` returns one message a
live consumer gives back, and drops its record, in one step.
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import redis
from redis.exceptions import NoScriptError

from pluginpool.policy.keys import RedisKeys

_LUA = resources.files("pluginpool.tasks")
_LIB = _LUA.joinpath("delivery_lib.lua").read_text()


@dataclass(frozen=True)
class LuaScript:
    """A script's source (with the shared library prepended) and its SHA for EVALSHA."""

    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> LuaScript:
        source = _LIB + "\n" + _LUA.joinpath(name).read_text()
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


CLAIM = LuaScript.load("claim.lua")
ACK = LuaScript.load("ack.lua")
DEAD_LETTER = LuaScript.load("deadletter.lua")
RESCUE = LuaScript.load("rescue.lua")
PUBLISH = LuaScript.load("publish.lua")
INDEX = LuaScript.load("index.lua")
HANDBACK = LuaScript.load("handback.lua")
RETIRE = LuaScript.load("retire.lua")

DELIVERY_OPTION = "pluginpool_delivery"
"""kombu transport option carrying a `DeliveryConfig` as a dict."""


_KEYS = RedisKeys()
"""The default key names (prefix `pluginpool:`), from the one module that names keys."""


@dataclass(frozen=True)
class DeliveryConfig:
    """Key names and bounds of the delivery path, passed to the transport as an option.

    The defaults are pluginpool's default key prefix and settings, so the transport also
    works where no pluginpool settings are given (kombu's own test suite, plain kombu)."""

    deliveries_key: str = _KEYS.deliveries
    owner_key: str = _KEYS.delivery_owner
    held_prefix: str = _KEYS.held_prefix
    consumers_key: str = _KEYS.consumers
    stats_key: str = _KEYS.delivery_stats
    dead_letter_key: str = _KEYS.dead_letter
    dead_letter_index_key: str = _KEYS.dead_letter_index
    quarantine_pending_key: str = _KEYS.quarantine_pending
    ready_prefix: str = _KEYS.ready_prefix
    wake_prefix: str = _KEYS.wake_prefix
    waiters_prefix: str = _KEYS.waiters_prefix
    consumes_prefix: str = _KEYS.consumes_prefix
    group: str = ""
    keyspace_events: bool = True
    rescan_s: float = 60.0
    wake_depth: int = 64
    scan_limit: int = 64
    max_deliveries: int = 3
    dead_letter_max: int = 10_000
    max_message_bytes: int = 4 * 1_048_576
    max_depth: int = 80
    dead_after_s: float = 10.0

    @classmethod
    def for_keys(cls, keys: RedisKeys, **bounds: Any) -> DeliveryConfig:
        """The key names of one deployment (its prefix), with the given bounds."""
        return cls(
            deliveries_key=keys.deliveries, owner_key=keys.delivery_owner,
            held_prefix=keys.held_prefix, consumers_key=keys.consumers,
            stats_key=keys.delivery_stats, dead_letter_key=keys.dead_letter,
            dead_letter_index_key=keys.dead_letter_index,
            quarantine_pending_key=keys.quarantine_pending, ready_prefix=keys.ready_prefix,
            wake_prefix=keys.wake_prefix, waiters_prefix=keys.waiters_prefix,
            consumes_prefix=keys.consumes_prefix, **bounds)

    @classmethod
    def from_option(cls, value: Any) -> DeliveryConfig:
        if isinstance(value, DeliveryConfig):
            return value
        return cls(**value) if isinstance(value, dict) else cls()

    def as_option(self) -> dict[str, Any]:
        return asdict(self)

    def held_key(self, consumer: str) -> str:
        return f"{self.held_prefix}{consumer}"

    def consumes_key(self, consumer: str) -> str:
        return f"{self.consumes_prefix}{consumer}"

    def waiters_key(self, queue: str) -> str:
        return f"{self.waiters_prefix}{queue}"


def new_consumer_id() -> str:
    """A consumer id (`host:pid:random`) for one consuming channel: a reconnected channel
    or a restarted worker is a new consumer, so what the old one held is rescued once its
    heartbeat stops, never mistaken for the new one's."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


unprefixed: Any = redis.Redis.execute_command
"""A Redis command with its keys as given: kombu's key-prefixing client would prefix only
the first key of an EVALSHA, so callers pass keys already prefixed."""
unprefixed_in_pipe: Any = redis.client.Pipeline.execute_command


def run_script(client: Any, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
    """EVALSHA, loading the script on NOSCRIPT (keys already prefixed)."""
    try:
        return unprefixed(client, "EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return unprefixed(client, "EVAL", script.source, len(keys), *keys, *args)
