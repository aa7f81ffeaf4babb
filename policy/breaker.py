"""A circuit breaker per plugin, shared in Redis by every producer and worker.

resilience4j's semantics (sliding window, minimum calls, failure and slow-call rates,
exactly N half-open trials, growing waits) with the state in Redis and every transition one
atomic Lua script (`breaker.lua`, loaded once, called by SHA): `acquire` before dispatch and
`record` after a run are one round trip each. Transitions are published on a Redis channel.

When Redis is unreachable, `fail_mode` decides: "closed" (the default) refuses dispatch,
"open" lets it through unguarded. Either way the caller is told which happened.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field

from pluginpool.policy.errors import BreakerUnavailableError, ErrorType
from pluginpool.policy.keys import RedisKeys
from pluginpool.policy.redis_text import as_text

logger = logging.getLogger("pluginpool.breaker")

LUA_SOURCE = "\n".join(resources.files("pluginpool.policy").joinpath(name).read_text()
                       for name in ("outcome.lua", "breaker.lua"))


class BreakerState(StrEnum):
    """The three states of a plugin's breaker."""

    CLOSED = "closed"
    """Normal: every dispatch is admitted; outcomes fill the sliding window."""
    OPEN = "open"
    """Tripped: dispatch is refused until the wait (`open_ms`, growing) is over."""
    HALF_OPEN = "half_open"
    """Probing: exactly `half_open_calls` trial runs are admitted across all producers;
    all succeeding closes the breaker, any failing opens it again with a longer wait."""


class BreakerConfig(BaseModel):
    """Per-plugin breaker settings (spec `breaker`), defaults from the deployment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_type: Literal["count", "time"] = "count"
    window_size: int = Field(default=20, ge=1, le=10_000,
                             description="runs (count) or seconds (time)")
    minimum_calls: int = Field(default=10, ge=1)
    failure_rate_threshold: float = Field(default=0.5, gt=0, le=1)
    slow_call_rate_threshold: float = Field(default=1.0, gt=0, le=1)
    slow_call_ms: int = Field(default=60_000, ge=1)
    failure_types: tuple[ErrorType, ...] = (ErrorType.RUNTIME, ErrorType.RESOURCE,
                                            ErrorType.TIMEOUT)
    open_at_once_types: tuple[ErrorType, ...] = (ErrorType.SECURITY, ErrorType.DEPENDENCY)
    open_ms: int | None = Field(default=None, ge=1,
                                description="first wait when open; default restart_cooldown_ms")
    backoff_factor: float = Field(default=2.0, ge=1)
    max_open_ms: int = Field(default=300_000, ge=1)
    half_open_calls: int = Field(default=3, ge=1, le=1000)
    trial_timeout_ms: int = Field(default=120_000, ge=1,
                                  description="re-issue trial permits not reported by then")

    def lua_json(self, *, default_open_ms: int) -> str:
        """The config as the Lua script reads it; cached, since it is sent on every call."""
        return _lua_json(self, default_open_ms)

    def _lua_json_uncached(self, default_open_ms: int) -> str:
        return json.dumps({
            "window_type": self.window_type, "window_size": self.window_size,
            "minimum_calls": self.minimum_calls,
            "failure_rate_threshold": self.failure_rate_threshold,
            "slow_call_rate_threshold": self.slow_call_rate_threshold,
            "open_ms": self.open_ms or default_open_ms, "backoff_factor": self.backoff_factor,
            "max_open_ms": self.max_open_ms, "half_open_calls": self.half_open_calls,
            "trial_timeout_ms": self.trial_timeout_ms,
        })

    def outcome_code(self, error_type: ErrorType | None) -> str:
        """s = success, x = opens at once, f = counted failure, i = not counted."""
        if error_type is None:
            return "s"
        if error_type in self.open_at_once_types:
            return "x"
        return "f" if error_type in self.failure_types else "i"


@functools.lru_cache(maxsize=1024)
def _lua_json(config: BreakerConfig, default_open_ms: int) -> str:
    return config._lua_json_uncached(default_open_ms)


@dataclass(frozen=True)
class Permit:
    """The answer of `acquire`: admitted or not, and for a trial, its generation."""

    allowed: bool
    state: BreakerState
    retry_after_ms: int = 0
    generation: int = 0
    unguarded: bool = False
    """True when Redis was unreachable and fail_mode="open" let the call through."""


UNGUARDED = Permit(True, BreakerState.CLOSED, unguarded=True)
"""The permit used when the breaker is switched off."""


@dataclass(frozen=True)
class BreakerStatus:
    plugin_id: str
    state: BreakerState
    forced: bool
    retry_after_ms: int
    window_total: int
    window_failed: int
    window_slow: int
    failure_rate: float
    open_ms: int
    permits_left: int
    trial_successes: int
    reason: str
    history: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in self.__dict__.items()}


BreakerUnavailable = BreakerUnavailableError
"""The name this module used before the exception tree was one; kept for callers."""


class CircuitBreaker:
    """Acquire, record, override and inspect plugin breakers in Redis."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, *,
                 fail_mode: Literal["closed", "open"] = "closed") -> None:
        self._redis = client
        self._keys = keys
        self.fail_mode = fail_mode
        self._script = client.register_script(LUA_SOURCE)

    def _call(self, op: str, plugin_id: str, config: BreakerConfig, default_open_ms: int,
              *extra: str | int) -> Any:
        keys, args = self._keys_args(op, plugin_id, config, default_open_ms, *extra)
        return self._script(keys=keys, args=args)

    def _keys_args(self, op: str, plugin_id: str, config: BreakerConfig,
                   default_open_ms: int, *extra: str | int) -> tuple[list[str], list[Any]]:
        keys = self._keys
        return ([keys.breaker(plugin_id), keys.breaker_window(plugin_id),
                 keys.breaker_window_failed(plugin_id), keys.breaker_window_slow(plugin_id),
                 keys.breaker_history(plugin_id), keys.health(plugin_id),
                 keys.recent_errors(plugin_id)],
                [op, config.lua_json(default_open_ms=default_open_ms), keys.breaker_channel,
                 plugin_id, *extra])

    @property
    def script_sha(self) -> str:
        """The SHA to EVALSHA a `record_call` with."""
        return str(self._script.sha)

    def acquire(self, plugin_id: str, config: BreakerConfig, *, default_open_ms: int,
                token: int = 0) -> Permit:
        """One round trip. `token` is the trial generation a producer was already given."""
        try:
            allowed, state, retry_after, generation = self._call(
                "acquire", plugin_id, config, default_open_ms, token)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if self.fail_mode == "open":
                logger.warning("breaker for %s unreachable, failing open: %s", plugin_id, exc)
                return Permit(True, BreakerState.CLOSED, unguarded=True)
            raise BreakerUnavailableError(
                f"breaker for {plugin_id!r} unreachable (fail mode closed): {exc}") from exc
        return Permit(bool(allowed), BreakerState(as_text(state)), int(retry_after),
                      int(generation))

    def record(self, plugin_id: str, config: BreakerConfig, *, default_open_ms: int,
               error_type: ErrorType | None, duration_ms: float, generation: int = 0,
               error_event: dict[str, Any] | None = None,
               figures: dict[str, Any] | None = None,
               breaker_enabled: bool = True,
               notify: tuple[str, str] | None = None, counted: bool = True) -> Permit | None:
        """One round trip: the outcome in the breaker's window, the plugin's durable health
        figures (runs, outcomes, latency, usage), the error event for `on_error`, and
        `notify` (channel, message), one more PUBLISH (the run's usage event).

        Returns the breaker's state afterwards (as a Permit without a trial generation),
        so a worker learns of a transition without asking again; None if Redis failed."""
        keys, args = self.record_call(
            plugin_id, config, default_open_ms=default_open_ms, error_type=error_type,
            duration_ms=duration_ms, generation=generation, error_event=error_event,
            figures=figures, breaker_enabled=breaker_enabled, notify=notify, counted=counted)
        try:
            reply = self._script(keys=keys, args=args)
        except redis.RedisError as exc:
            logger.error("could not record outcome of %s in its breaker: %s", plugin_id, exc)
            return None
        return self.record_reply(reply)

    def record_call(self, plugin_id: str, config: BreakerConfig, *, default_open_ms: int,
                    error_type: ErrorType | None, duration_ms: float, generation: int = 0,
                    error_event: dict[str, Any] | None = None,
                    figures: dict[str, Any] | None = None, breaker_enabled: bool = True,
                    notify: tuple[str, str] | None = None, counted: bool = True
                    ) -> tuple[list[str], list[Any]]:
        """The keys and arguments of `record`'s one script call, for a caller that sends it
        (EVALSHA `script_sha`) in a transaction of its own; `record_reply` reads its reply.
        `counted=False`: an outcome that says nothing of the plugin's health (a listed
        operation its code lacks: every other operation works) is kept in the health
        figures and events but not in the breaker's window."""
        slow = "1" if duration_ms >= config.slow_call_ms else "0"
        event = json.dumps(error_event) if error_event is not None else ""
        health = json.dumps({**(figures or {}), "wall_ms": duration_ms,
                             "error_type": str(error_type) if error_type else None})
        return self._keys_args("record", plugin_id, config, default_open_ms, generation,
                               config.outcome_code(error_type) if counted else "i", slow,
                               self._keys.error_channel, event, health,
                               self._keys.health_minute_prefix(plugin_id),
                               "0" if breaker_enabled else "1", *(notify or ("", "")))

    @staticmethod
    def record_reply(reply: Any) -> Permit:
        """The breaker's state after a record, from the script's reply."""
        state, retry_after = reply
        after = BreakerState(as_text(state))
        return Permit(after is not BreakerState.OPEN, after, int(retry_after))

    def override(self, plugin_id: str, config: BreakerConfig, *, default_open_ms: int,
                 action: Literal["reset", "force_open", "trial"]) -> BreakerState:
        """reset and force_open: an operator's; trial: a new revision was registered, so an
        open breaker (not forced) goes half-open at once and its trials run the new code."""
        [state] = self._call("override", plugin_id, config, default_open_ms, 0, action)
        return BreakerState(as_text(state))

    def status(self, plugin_id: str, config: BreakerConfig, *,
               default_open_ms: int) -> BreakerStatus:
        raw = json.loads(as_text(self._call("status", plugin_id, config, default_open_ms, 0)))
        history = raw["history"] if isinstance(raw["history"], list) else []
        total = int(raw["window_total"])
        return BreakerStatus(
            plugin_id=plugin_id, state=BreakerState(raw["state"]), forced=raw["forced"],
            retry_after_ms=int(raw["retry_after_ms"]), window_total=total,
            window_failed=int(raw["window_failed"]), window_slow=int(raw["window_slow"]),
            failure_rate=round(int(raw["window_failed"]) / total, 4) if total else 0.0,
            open_ms=int(raw["open_ms"]), permits_left=int(raw["permits"]),
            trial_successes=int(raw["trial_ok"]), reason=raw["reason"],
            history=[json.loads(item) for item in history])
