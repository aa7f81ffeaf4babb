"""Redis clients for pluginpool's own state (registry, instances), built from settings."""

from __future__ import annotations

import redis

from pluginpool.tasks.settings import Settings


def redis_client(settings: Settings) -> redis.Redis:
    """A client with bounded timeouts, so an unreachable Redis fails fast instead of hanging."""
    return redis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_socket_timeout_s,
        health_check_interval=30,
        retry_on_timeout=False,
    )
