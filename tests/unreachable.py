"""A Redis nobody answers, for tests of what happens when Redis is down. Light on purpose:
test modules whose helpers run in spawned processes import it without tests.conftest."""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def unreachable_redis() -> redis.Redis:
    """A client of a port nothing listens on, failing at the first refusal: redis-py's
    default retry (3 more attempts with backoff) would spend about 5 s per call on it."""
    return redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5,
                       retry=Retry(NoBackoff(), 0))
