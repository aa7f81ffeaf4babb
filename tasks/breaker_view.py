"""The producer's look at a plugin's breaker at submit, without a round trip per job.

A producer remembers what its last `acquire` answered and forgets it the moment a
transition of that plugin arrives on the breaker channel (`breaker.lua` publishes every
one). "closed" is then trusted for `breaker_gate_cache_ms`, the bound the worker's gate
(pool/gate.py) uses, and "open" until its wait is over; "half_open" is never remembered,
so every trial permit is still handed out by Redis, exactly. The bound matters only when a
transition event is lost or late (the subscriber reconnecting): a producer may then admit
jobs for at most `breaker_gate_cache_ms` after the breaker opened, and the worker's gate
refuses them (CircuitOpenError), as it does a backlog.

An answer is trusted only for the `CircuitBreaker` that gave it, and only if no transition
of the plugin arrived while it was in flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pluginpool.policy.breaker import BreakerState, CircuitBreaker, Permit
from pluginpool.tasks.spec import PluginSpec

Follow = Callable[[Callable[[dict[str, Any]], None]], None]
"""Subscribes a handler to every breaker transition (all plugins)."""


@dataclass(frozen=True)
class _Known:
    permit: Permit
    valid_until: float
    source: CircuitBreaker


class BreakerView:
    """Per-producer cache in front of `CircuitBreaker.acquire`; thread-safe."""

    def __init__(self, *, cache_ms: int, follow: Follow) -> None:
        self._cache_s = cache_ms / 1000
        self._follow = follow
        self._following = False
        self._known: dict[str, _Known] = {}
        self._epoch: dict[str, int] = {}
        self._lock = threading.Lock()

    def admit(self, breakers: CircuitBreaker, spec: PluginSpec) -> Permit:
        """The cached answer while it holds; otherwise one acquire (and it is remembered)."""
        if not self._following:
            self._follow(self.on_transition)  # before the first acquire, so none is missed
            self._following = True
        now = time.monotonic()
        with self._lock:
            known = self._known.get(spec.id)
            epoch = self._epoch.get(spec.id, 0)
        if known is not None and known.source is breakers and now < known.valid_until:
            permit = known.permit
            if permit.state is BreakerState.OPEN and permit.retry_after_ms > 0:
                return Permit(False, permit.state, int((known.valid_until - now) * 1000))
            return permit
        permit = breakers.acquire(spec.id, spec.breaker, default_open_ms=spec.default_open_ms)
        self._learn(breakers, spec.id, permit, epoch=epoch, at=now)
        return permit

    def on_transition(self, event: dict[str, Any]) -> None:
        """A transition was published: what this producer knew about the plugin is stale."""
        plugin_id = str(event.get("plugin", ""))
        with self._lock:
            self._known.pop(plugin_id, None)
            self._epoch[plugin_id] = self._epoch.get(plugin_id, 0) + 1

    def forget(self) -> None:
        with self._lock:
            self._known.clear()

    def _learn(self, breakers: CircuitBreaker, plugin_id: str, permit: Permit, *,
               epoch: int, at: float) -> None:
        if permit.state is BreakerState.HALF_OPEN or permit.unguarded:
            return
        if permit.state is BreakerState.OPEN:
            if permit.retry_after_ms <= 0:
                return  # forced open: ask each time, an operator's reset must be seen at once
            ttl_s = permit.retry_after_ms / 1000
        else:
            ttl_s = self._cache_s
        state_only = Permit(permit.allowed, permit.state, permit.retry_after_ms)
        with self._lock:
            if self._epoch.get(plugin_id, 0) == epoch:  # no transition while in flight
                self._known[plugin_id] = _Known(state_only, at + ttl_s, breakers)
