"""Recording an outcome can carry one more PUBLISH (the run's usage event) in the same
round trip; without it nothing more is published."""

from __future__ import annotations

import time
import uuid

import redis

from pluginpool.policy.breaker import BreakerConfig, CircuitBreaker
from pluginpool.policy.keys import RedisKeys


def test_record_publishes_the_notification_in_the_same_call(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = RedisKeys(f"ppnotify:{uuid.uuid4().hex[:8]}:")
    breaker = CircuitBreaker(client, keys)
    listener = client.pubsub()
    listener.subscribe("ppnotify-usage")
    assert listener.get_message(timeout=2)["type"] == "subscribe"  # type: ignore[index]
    after = breaker.record("p", BreakerConfig(), default_open_ms=1000, error_type=None,
                           duration_ms=1.0, notify=("ppnotify-usage", '{"usage": 1}'))
    breaker.record("p", BreakerConfig(), default_open_ms=1000, error_type=None,
                   duration_ms=1.0)
    assert after is not None and after.allowed
    messages = []
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        message = listener.get_message(timeout=0.2)
        if message is not None:
            messages.append(message["data"])
    assert messages == [b'{"usage": 1}']
    assert client.hget(keys.health("p"), "runs") == b"2"
    listener.close()
