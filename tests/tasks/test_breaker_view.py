"""The producer's cached breaker view: a closed breaker costs no round trip per submit,
a transition drops what was known, half-open trials are always handed out by Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from pluginpool.policy.breaker import BreakerState, CircuitBreaker, Permit
from pluginpool.policy.errors import ErrorType
from pluginpool.policy.keys import RedisKeys
from pluginpool.tasks.breaker_view import BreakerView
from pluginpool.tasks.spec import PluginSpec

SPEC = PluginSpec.model_validate({
    "id": "view-p", "name": "view", "entrypoint": "x:y",
    "breaker": {"window_size": 10, "minimum_calls": 2, "open_ms": 200, "half_open_calls": 2}})


class CountingBreaker(CircuitBreaker):
    """A real breaker that counts the acquires that reach Redis."""

    acquires = 0

    def acquire(self, plugin_id: str, *args: Any, **kwargs: Any) -> Permit:
        self.acquires += 1
        return super().acquire(plugin_id, *args, **kwargs)


@pytest.fixture
def breaker(redis_url: str) -> Iterator[CountingBreaker]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield CountingBreaker(client, RedisKeys(f"ppview:{uuid.uuid4().hex[:8]}:"))
    client.close()


def view(cache_ms: int = 60_000) -> tuple[BreakerView, list[Any]]:
    handlers: list[Any] = []
    return BreakerView(cache_ms=cache_ms, follow=handlers.append), handlers


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(2):
        breaker.record(SPEC.id, SPEC.breaker, default_open_ms=SPEC.default_open_ms,
                       error_type=ErrorType.RUNTIME, duration_ms=1.0)


def test_a_closed_breaker_is_asked_once_then_trusted(breaker: CountingBreaker) -> None:
    v, handlers = view()
    permits = [v.admit(breaker, SPEC) for _ in range(50)]
    assert all(p.allowed and p.state is BreakerState.CLOSED for p in permits)
    assert breaker.acquires == 1
    assert handlers == [v.on_transition]  # it follows the channel before the first acquire


def test_a_transition_event_drops_what_was_known(breaker: CountingBreaker) -> None:
    v, _ = view()
    v.admit(breaker, SPEC)
    trip(breaker)
    v.on_transition({"plugin": SPEC.id, "from": "closed", "to": "open"})
    refused = v.admit(breaker, SPEC)
    assert not refused.allowed and refused.state is BreakerState.OPEN
    assert refused.retry_after_ms > 0
    again = v.admit(breaker, SPEC)  # open is trusted until its wait is over
    assert not again.allowed and breaker.acquires == 2


def test_without_an_event_the_bound_is_cache_ms(breaker: CountingBreaker) -> None:
    v, _ = view(cache_ms=0)
    v.admit(breaker, SPEC)
    trip(breaker)
    assert not v.admit(breaker, SPEC).allowed


def test_half_open_permits_stay_exact(breaker: CountingBreaker) -> None:
    v, _ = view()
    trip(breaker)
    v.on_transition({"plugin": SPEC.id})
    time.sleep(0.25)
    admitted = [v.admit(breaker, SPEC) for _ in range(5)]
    assert [p.allowed for p in admitted] == [True, True, False, False, False]
    assert all(p.state is BreakerState.HALF_OPEN for p in admitted)
    assert breaker.acquires == 5


def test_an_answer_holds_only_for_the_breaker_that_gave_it(
        breaker: CountingBreaker, redis_url: str) -> None:
    v, _ = view()
    v.admit(breaker, SPEC)
    other = CountingBreaker(redis.Redis.from_url(redis_url), breaker._keys)
    v.admit(other, SPEC)
    assert other.acquires == 1


def test_a_transition_while_asking_is_not_overwritten(breaker: CountingBreaker) -> None:
    v, _ = view()

    class Racing(CountingBreaker):
        def acquire(self, plugin_id: str, *args: Any, **kwargs: Any) -> Permit:
            permit = super().acquire(plugin_id, *args, **kwargs)
            v.on_transition({"plugin": plugin_id})  # arrives before the answer is used
            return permit

    racing = Racing(breaker._redis, breaker._keys)
    v.admit(racing, SPEC)
    v.admit(racing, SPEC)
    assert racing.acquires == 2
