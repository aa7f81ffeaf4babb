"""A plugin's recent runs, successes and failures alike, with their logs: what an operator
opens first when a plugin misbehaves. A bounded Redis list per plugin, newest first,
written by the worker after each run (one LPUSH + LTRIM in the run's bookkeeping)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis
from redis.exceptions import NoScriptError

from pluginpool.policy.keys import RedisKeys
from pluginpool.tasks import instance_usage
from pluginpool.tasks.run_logs import forward

logger = logging.getLogger("pluginpool.execution")

RECENT_RUNS = 30
"""Runs kept per plugin; each holds at most max_log_bytes of logs."""


class RecentRuns:
    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self._redis = client
        self._keys = keys

    def record(self, pipe: Any, plugin_id: str, *, job_id: str, ok: bool,
               duration_ms: float, error: dict[str, Any] | None, logs: str,
               worker: str | None, instance_id: str | None) -> None:
        """Queue the write on `pipe` (a pipeline of the caller's bookkeeping)."""
        entry = {"job_id": job_id, "ok": ok, "at": time.time(),
                 "duration_ms": round(duration_ms, 1), "worker": worker,
                 "instance_id": instance_id, "error": error, "logs": logs}
        key = self._keys.recent_runs(plugin_id)
        pipe.lpush(key, json.dumps(entry))
        pipe.ltrim(key, 0, RECENT_RUNS - 1)

    def read(self, plugin_id: str, *, limit: int = RECENT_RUNS) -> list[dict[str, Any]]:
        raws: list[Any] = self._redis.lrange(  # type: ignore[assignment]
            self._keys.recent_runs(plugin_id), 0, limit - 1)
        return [json.loads(raw) for raw in raws]


def after_run(client: redis.Redis, keys: RedisKeys, plugin_id: str, *, job_id: str,
              ok: bool, duration_ms: float, error: dict[str, Any] | None, logs: str,
              worker: str | None, instance_id: str | None, log_level: str) -> None:
    """Keep the run in the plugin's recent runs (and its logs in the instance's last run),
    and write its logs to the worker's log line by line, before Celery's line for the
    outcome (a success without its value: pool/trace_filter.py)."""
    try:
        with client.pipeline(transaction=False) as pipe:
            RecentRuns(client, keys).record(
                pipe, plugin_id, job_id=job_id, ok=ok, duration_ms=duration_ms,
                error=error, logs=logs, worker=worker, instance_id=instance_id)
            if instance_id is not None:
                instance_usage.queue_logs(pipe, keys, instance_id, logs)
            replies = pipe.execute(raise_on_error=False)
        if instance_id is not None and instance_usage.lost(replies):
            replies = [r for r in replies if not isinstance(r, NoScriptError)]
            replies += instance_usage.write_alone(client, lambda again: instance_usage.
                                                  queue_logs(again, keys, instance_id, logs))
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
    except redis.RedisError as exc:  # the run's outcome stands; only this record is lost
        logger.warning("could not record run %s of %s: %s", job_id, plugin_id, exc)
    forward(logs, plugin_id=plugin_id, job_id=job_id, level=log_level)


def without_logs(error: dict[str, Any]) -> dict[str, Any]:
    """An error as a recent run keeps it: its logs are beside it, not in it twice."""
    details = {k: v for k, v in (error.get("details") or {}).items() if k != "logs"}
    return {**error, "details": details}
