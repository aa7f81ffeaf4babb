"""The breaker's semantics, on real Redis (its state lives there), without workers."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from pluginpool.policy.breaker import (
    BreakerConfig,
    BreakerState,
    BreakerUnavailable,
    CircuitBreaker,
)
from pluginpool.policy.errors import ErrorType
from pluginpool.policy.keys import RedisKeys
from tests.unreachable import unreachable_redis

RUNTIME = ErrorType.RUNTIME


@pytest.fixture
def breaker(redis_url: str) -> Iterator[CircuitBreaker]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield CircuitBreaker(client, RedisKeys(f"ppbrk:{uuid.uuid4().hex[:8]}:"))
    client.close()


def config(**overrides: Any) -> BreakerConfig:
    base: dict[str, Any] = {"window_size": 10, "minimum_calls": 4,
                            "failure_rate_threshold": 0.5, "open_ms": 300,
                            "half_open_calls": 2, "backoff_factor": 2.0, "max_open_ms": 1000}
    return BreakerConfig(**{**base, **overrides})


def record(breaker: CircuitBreaker, cfg: BreakerConfig, error: ErrorType | None,
           *, generation: int = 0, duration_ms: float = 1.0) -> BreakerState | None:
    after = breaker.record("p", cfg, default_open_ms=1000, error_type=error,
                           duration_ms=duration_ms, generation=generation)
    return None if after is None else after.state


def acquire(breaker: CircuitBreaker, cfg: BreakerConfig, token: int = 0) -> Any:
    return breaker.acquire("p", cfg, default_open_ms=1000, token=token)


def trip(breaker: CircuitBreaker, cfg: BreakerConfig) -> None:
    for _ in range(cfg.minimum_calls):
        record(breaker, cfg, RUNTIME)
    assert acquire(breaker, cfg).state is BreakerState.OPEN


def wait_half_open(breaker: CircuitBreaker, cfg: BreakerConfig) -> None:
    status = breaker.status("p", cfg, default_open_ms=1000)
    time.sleep(status.retry_after_ms / 1000 + 0.05)


def test_does_not_open_before_minimum_calls(breaker: CircuitBreaker) -> None:
    cfg = config()
    for _ in range(3):
        assert record(breaker, cfg, RUNTIME) is BreakerState.CLOSED
    assert acquire(breaker, cfg).allowed
    assert record(breaker, cfg, RUNTIME) is BreakerState.OPEN
    permit = acquire(breaker, cfg)
    assert not permit.allowed and 0 < permit.retry_after_ms <= 300


def test_opens_at_the_failure_rate_and_not_below(breaker: CircuitBreaker) -> None:
    cfg = config(failure_rate_threshold=0.6, window_size=10, minimum_calls=10)
    for error in [None] * 5 + [RUNTIME] * 5:
        record(breaker, cfg, error)
    assert acquire(breaker, cfg).state is BreakerState.CLOSED  # 5/10 = 50 % < 60 %
    record(breaker, cfg, RUNTIME)  # the window slides: the oldest success leaves, 6/10
    assert acquire(breaker, cfg).state is BreakerState.OPEN


def test_ignored_error_types_do_not_count(breaker: CircuitBreaker) -> None:
    cfg = config(failure_types=[ErrorType.RESOURCE])
    for _ in range(10):
        record(breaker, cfg, RUNTIME)
    status = breaker.status("p", cfg, default_open_ms=1000)
    assert status.state is BreakerState.CLOSED and status.window_total == 0


@pytest.mark.parametrize("error", [ErrorType.SECURITY, ErrorType.DEPENDENCY])
def test_security_and_dependency_errors_open_at_once(breaker: CircuitBreaker,
                                                     error: ErrorType) -> None:
    assert record(breaker, config(), error) is BreakerState.OPEN


def test_slow_call_rate_opens_it(breaker: CircuitBreaker) -> None:
    cfg = config(slow_call_ms=100, slow_call_rate_threshold=0.5)
    for _ in range(4):
        record(breaker, cfg, None, duration_ms=500)
    status = breaker.status("p", cfg, default_open_ms=1000)
    assert status.state is BreakerState.OPEN and "slow" in status.reason


def test_half_open_admits_exactly_n_trials_then_recovery_closes(breaker: CircuitBreaker) -> None:
    cfg = config()
    trip(breaker, cfg)
    wait_half_open(breaker, cfg)
    permits = [acquire(breaker, cfg) for _ in range(5)]
    assert [p.allowed for p in permits] == [True, True, False, False, False]
    generation = permits[0].generation
    assert permits[1].generation == generation > 0
    assert acquire(breaker, cfg, token=generation).allowed  # the same trial, seen at a worker
    record(breaker, cfg, None)  # not a trial: ignored in half-open
    assert acquire(breaker, cfg).state is BreakerState.HALF_OPEN
    record(breaker, cfg, None, generation=generation)
    assert record(breaker, cfg, None, generation=generation) is BreakerState.CLOSED
    status = breaker.status("p", cfg, default_open_ms=1000)
    assert status.window_total == 0 and status.history[0]["to"] == "closed"


def test_a_trial_whose_outcome_is_not_counted_gives_its_permit_back(
        breaker: CircuitBreaker) -> None:
    """A trial that told nothing (a call of a listed operation the code lacks): before, its
    permit was spent, and with all spent so every submit was refused until
    trial_timeout_ms re-issued them."""
    cfg = config(half_open_calls=1)
    trip(breaker, cfg)
    wait_half_open(breaker, cfg)
    trial = acquire(breaker, cfg)
    assert trial.allowed and not acquire(breaker, cfg).allowed
    after = breaker.record("p", cfg, default_open_ms=1000, error_type=ErrorType.DEPENDENCY,
                           duration_ms=1.0, generation=trial.generation, counted=False)
    assert after is not None and after.state is BreakerState.HALF_OPEN
    again = acquire(breaker, cfg)
    assert again.allowed and again.generation == trial.generation
    assert not acquire(breaker, cfg).allowed  # one permit back, not more
    assert record(breaker, cfg, None, generation=trial.generation) is BreakerState.CLOSED


def test_a_failing_trial_reopens_with_a_longer_capped_wait(breaker: CircuitBreaker) -> None:
    cfg = config()
    trip(breaker, cfg)
    waits = []
    for _ in range(3):
        wait_half_open(breaker, cfg)
        permit = acquire(breaker, cfg)
        assert permit.allowed and permit.state is BreakerState.HALF_OPEN
        assert record(breaker, cfg, RUNTIME, generation=permit.generation) is BreakerState.OPEN
        waits.append(breaker.status("p", cfg, default_open_ms=1000).open_ms)
    assert waits == [600, 1000, 1000]


def test_time_window_forgets_old_outcomes(breaker: CircuitBreaker) -> None:
    cfg = config(window_type="time", window_size=1, minimum_calls=3)
    record(breaker, cfg, RUNTIME)
    record(breaker, cfg, RUNTIME)
    time.sleep(1.2)
    assert record(breaker, cfg, RUNTIME) is BreakerState.CLOSED
    assert breaker.status("p", cfg, default_open_ms=1000).window_total == 1
    record(breaker, cfg, RUNTIME)
    assert record(breaker, cfg, RUNTIME) is BreakerState.OPEN


def test_operator_override_is_recorded(breaker: CircuitBreaker) -> None:
    cfg = config()
    breaker.override("p", cfg, default_open_ms=1000, action="force_open")
    permit = acquire(breaker, cfg)
    assert not permit.allowed and permit.retry_after_ms == -1
    time.sleep(1.1)  # longer than max_open_ms: a forced breaker stays open
    assert not acquire(breaker, cfg).allowed
    breaker.override("p", cfg, default_open_ms=1000, action="reset")
    status = breaker.status("p", cfg, default_open_ms=1000)
    assert status.state is BreakerState.CLOSED and not status.forced
    assert [e["reason"] for e in status.history[:2]] == ["reset by operator",
                                                          "forced open by operator"]


def test_lost_trials_are_reissued_after_the_trial_timeout(breaker: CircuitBreaker) -> None:
    cfg = config(half_open_calls=1, trial_timeout_ms=300)
    trip(breaker, cfg)
    wait_half_open(breaker, cfg)
    first = acquire(breaker, cfg)
    assert first.allowed and not acquire(breaker, cfg).allowed
    time.sleep(0.4)
    again = acquire(breaker, cfg)
    assert again.allowed and again.generation == first.generation + 1


def test_transitions_are_published(breaker: CircuitBreaker, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    pubsub = client.pubsub()
    pubsub.subscribe(breaker._keys.breaker_channel)
    pubsub.get_message(timeout=1)
    trip(breaker, config())
    message = pubsub.get_message(timeout=2)
    assert message is not None and '"to":"open"' in message["data"]
    pubsub.close()
    client.close()


def test_unreachable_redis_fails_closed_or_open_as_configured() -> None:
    dead = unreachable_redis()
    with pytest.raises(BreakerUnavailable):
        CircuitBreaker(dead, RedisKeys(), fail_mode="closed").acquire(
            "p", config(), default_open_ms=1000)
    permit = CircuitBreaker(dead, RedisKeys(), fail_mode="open").acquire(
        "p", config(), default_open_ms=1000)
    assert permit.allowed and permit.unguarded


def _race(url: str, prefix: str, ready: Any, go: Any, out: Any) -> None:
    client = redis.Redis.from_url(url, decode_responses=True)
    breaker = CircuitBreaker(client, RedisKeys(prefix))
    client.ping()
    ready.release()
    go.wait(60)
    allowed = 0
    for _ in range(50):
        allowed += breaker.acquire("p", config(), default_open_ms=1000).allowed
    out.put(allowed)


def test_half_open_permits_hold_under_16_racing_producer_processes(
        breaker: CircuitBreaker, redis_url: str) -> None:
    cfg = config()
    trip(breaker, cfg)
    wait_half_open(breaker, cfg)
    # Forked from a server that imported this module once (spawn re-imports it in each of
    # the 16), all released together once every one is connected.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    out: Any = context.Queue()
    ready, go = context.Semaphore(0), context.Event()
    procs = [context.Process(target=_race, args=(redis_url, breaker._keys.prefix, ready, go, out))
             for _ in range(16)]
    for proc in procs:
        proc.start()
    for _ in procs:
        assert ready.acquire(timeout=60)
    go.set()
    admitted = sum(out.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=10)
    assert admitted == cfg.half_open_calls
