"""The worker's look at a plugin's breaker before a run, without a round trip per job.

Each pool process remembers the state it last learned (from an acquire, or from the reply
to its last `record`, which returns the state afterwards). "closed" is trusted for
`breaker_gate_cache_ms`, "open" until its wait is over; "half_open" and trial jobs always
ask Redis, so exactly the admitted trials run. A backlog therefore fails fast at most
`breaker_gate_cache_ms` after the breaker opened elsewhere, and at once in the process
that saw the failure which opened it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pluginpool.policy.breaker import BreakerState, CircuitBreaker, Permit
from pluginpool.tasks.spec import PluginSpec


@dataclass
class _Known:
    permit: Permit
    valid_until: float


class BreakerGate:
    """Per-process cache in front of `CircuitBreaker.acquire` for workers."""

    def __init__(self, breakers: CircuitBreaker, *, cache_ms: int) -> None:
        self._breakers = breakers
        self._cache_s = cache_ms / 1000
        self._known: dict[str, _Known] = {}

    def admit(self, spec: PluginSpec, *, token: int) -> Permit:
        now = time.monotonic()
        known = self._known.get(spec.id)
        if token == 0 and known is not None and now < known.valid_until:
            permit = known.permit
            if permit.state is BreakerState.OPEN and permit.retry_after_ms > 0:
                remaining = int((known.valid_until - now) * 1000)
                return Permit(False, permit.state, remaining)
            return permit
        permit = self._breakers.acquire(spec.id, spec.breaker,
                                        default_open_ms=spec.default_open_ms, token=token)
        self.learn(spec.id, permit)
        return permit

    def learn(self, plugin_id: str, permit: Permit | None) -> None:
        """Remember what an acquire or a record reply said about the breaker."""
        if permit is None or permit.state is BreakerState.HALF_OPEN or permit.unguarded:
            self._known.pop(plugin_id, None)
            return
        if permit.state is BreakerState.OPEN and permit.retry_after_ms > 0:
            ttl_s = permit.retry_after_ms / 1000
        else:
            ttl_s = self._cache_s
        state_only = Permit(permit.state is not BreakerState.OPEN, permit.state,
                            permit.retry_after_ms)
        self._known[plugin_id] = _Known(state_only, time.monotonic() + ttl_s)
