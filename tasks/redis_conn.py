"""Redis clients for pluginpool's own state (registry, instances, breaker, health), built
from settings: a plain URL, TLS (rediss://, verified against redis_tls_ca_file), or a
Sentinel-managed master (sentinel://host:port;sentinel://host:port + the master name)."""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlparse

import redis
from redis.sentinel import Sentinel

from pluginpool.tasks.settings import Settings, database_of


def sentinel_hosts(url: str) -> list[tuple[str, int]]:
    """`sentinel://h1:26379;sentinel://h2:26379` → [(h1, 26379), (h2, 26379)]."""
    hosts = []
    for part in url.split(";"):
        parsed = urlparse(part.strip())
        hosts.append((parsed.hostname or "127.0.0.1", parsed.port or 26379))
    return hosts


def client_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_socket_timeout_s,
        "health_check_interval": 30,
        "retry_on_timeout": False,
    }
    if settings.redis_url.startswith("rediss://"):
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        if settings.redis_tls_ca_file:
            options["ssl_ca_certs"] = settings.redis_tls_ca_file
    return options


def redis_client(settings: Settings, *, decode_responses: bool = True) -> redis.Redis:
    """A client with bounded timeouts, so an unreachable Redis fails fast instead of hanging.
    `decode_responses=False` for binary values (plugin artifacts)."""
    options = {**client_options(settings), "decode_responses": decode_responses}
    url = settings.redis_url
    if url.startswith("sentinel://"):
        parsed = urlparse(url.split(";")[0])
        db = database_of(url)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            sentinel_hosts(url), socket_timeout=settings.redis_socket_timeout_s,
            sentinel_kwargs={"password": parsed.password} if parsed.password else None)
        master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            str(settings.redis_sentinel_master), db=db, password=parsed.password, **options)
        return master
    return redis.Redis.from_url(url, **options)
