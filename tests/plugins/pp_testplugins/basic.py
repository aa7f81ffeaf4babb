"""Test plugins for the foundation: success, errors, timeouts, crashes, bad results."""

from __future__ import annotations

import os
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded


def echo(ctx: Any, payload: Any) -> Any:
    return {"payload": payload, "initial_data": ctx.initial_data, "attempt": ctx.attempt,
            "pid": os.getpid()}


def slow_echo(ctx: Any, payload: Any) -> Any:
    """echo after 10 ms: a backlog of these cannot be run while it is still being sent."""
    time.sleep(0.01)
    return echo(ctx, payload)


def raises(ctx: Any, payload: Any) -> Any:
    raise KeyError(f"missing field {payload!r}")


def sleeps(ctx: Any, payload: Any) -> Any:
    time.sleep(float(payload["seconds"]))
    return "woke up"


def swallows_soft_limit(ctx: Any, payload: Any) -> Any:
    deadline = time.monotonic() + float(payload["seconds"])
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except SoftTimeLimitExceeded:
            continue
    return "survived"


def crashes(ctx: Any, payload: Any) -> Any:
    os._exit(7)


def crashes_once(ctx: Any, payload: Any) -> Any:
    """Dies on its first attempt only: a restart recovers the job."""
    if ctx.attempt == 1:
        os._exit(9)
    return {"attempt": ctx.attempt}


def not_json(ctx: Any, payload: Any) -> Any:
    return {"when": object()}


def too_large(ctx: Any, payload: Any) -> Any:
    return "x" * int(payload["bytes"])


def calls_exit(ctx: Any, payload: Any) -> Any:
    raise SystemExit(3)


def fails_slowly(ctx: Any, payload: Any) -> Any:
    time.sleep(0.2)
    raise RuntimeError("downstream is down")


def fails_while_flag(ctx: Any, payload: Any) -> Any:
    """Fails while the file named in the payload exists: a plugin that can recover."""
    if os.path.exists(payload["flag"]):
        raise RuntimeError("still broken")
    return "recovered"


def count_and_sleep(ctx: Any, payload: Any) -> Any:
    """Counts every execution of a job in Redis (trusted, unsandboxed): duplicates show."""
    import redis

    client = redis.Redis.from_url(payload["redis_url"], socket_connect_timeout=1)
    for _attempt in range(60):  # the test may be restarting this Redis right now
        try:
            client.hincrby(payload["key"], ctx.job_id, 1)
            break
        except redis.ConnectionError:
            time.sleep(0.25)
    client.close()
    time.sleep(float(payload.get("seconds", 0.01)))
    return payload.get("n")
