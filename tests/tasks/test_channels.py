"""Pub/sub channels are the whole server's, keys one database's: deployments on two
databases of one Redis server (same key prefix) must not hear each other's events."""

from __future__ import annotations

import json
import threading
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings, database_of
from tests.conftest import make_settings


def on_database(url: str, db: int) -> str:
    """The same server, database `db` (the path's number; a `db` query option dropped)."""
    parts = urlsplit(url)
    query = "&".join(p for p in parts.query.split("&") if p and not p.startswith("db="))
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", query, ""))


def test_channel_names_carry_the_database_except_database_0() -> None:
    for url, scope in [("redis://h:6379", ""), ("redis://h:6379/0", ""),
                       ("redis://h:6379/5", "db5:"), ("redis://h?db=3", "db3:"),
                       ("unix:///run/redis.sock?db=2", "db2:"),
                       ("sentinel://h1:26379?db=4;sentinel://h2:26379", "db4:"),
                       ("sentinel://h1:26379/3;sentinel://h2:26379", "db3:")]:
        keys = Settings(_env_file=None, redis_url=url,  # type: ignore[call-arg]
                        redis_sentinel_master="m").keys
        assert keys.channel_scope == scope
        assert keys.error_channel == f"pluginpool:{scope}events:errors"
        assert keys.specs == "pluginpool:registry:specs"  # keys do not change


def test_deployments_on_two_databases_do_not_hear_each_others_errors(
        settings: Settings, client: PluginClient) -> None:
    """Another deployment's failures (published by its workers on its error channel) do not
    reach this one's `on_error("*")`; this one's do. Only PUBLISH is sent on the other
    database's connection: nothing is written there."""
    db = database_of(settings.redis_url)
    other = make_settings(on_database(settings.redis_url, (db + 1) % 16),
                          key_prefix=settings.key_prefix)
    assert other.keys.error_channel != settings.keys.error_channel
    seen: list[dict[str, Any]] = []
    arrived = threading.Event()

    def record(event: dict[str, Any]) -> None:
        seen.append(event)
        if event["plugin_id"] == "ours":
            arrived.set()

    client.on_error("*", record)
    theirs = redis.Redis.from_url(other.redis_url)
    try:
        deadline = time.monotonic() + 20
        while not arrived.is_set() and time.monotonic() < deadline:
            theirs.publish(other.keys.error_channel, json.dumps({"plugin_id": "theirs"}))
            client.redis.publish(settings.keys.error_channel,
                                 json.dumps({"plugin_id": "ours"}))
            arrived.wait(0.5)
    finally:
        theirs.close()
    assert arrived.is_set()
    assert {event["plugin_id"] for event in seen} == {"ours"}
