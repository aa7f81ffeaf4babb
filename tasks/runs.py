"""A plugin's recent runs, successes and failures alike, with their logs: what an operator
opens first when a plugin misbehaves. A bounded Redis list per plugin, newest first,
written by the worker after each run (one LPUSH + LTRIM in the run's bookkeeping)."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from pluginpool.policy.keys import RedisKeys

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
