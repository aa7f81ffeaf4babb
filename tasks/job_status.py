"""A job's status, stored and pushed: `queued`, `started`, `retrying`, then one of
`succeeded`, `failed`, `cancelled`.

Why Redis pub/sub on one channel per job, and not Celery's task events: task events go to
every event receiver of the fleet (a producer following one job would decode every event of
every job) and nothing keeps them (a producer that subscribes late, or another producer
holding the job id, could not read the status). Here each change is stored in a small
hash per job (seq → change) and published on the job's own channel in the same Lua step
(`write_status` in `job_status_lib.lua`), so a reader subscribes, then reads the list, and
gets every change exactly once, in order, by its sequence number; nothing polls.

Who writes, each riding on a round trip that happens anyway (issue 16): the producer's
publish writes `queued` in the same step as the push (`publish.lua`, tasks/submit_step.py);
the worker's pre-run check writes `started` (`job_start.lua`); the final status is written
in the same MULTI as Celery's result (tasks/result_store.py), so a subscriber that sees
`succeeded` or `failed` can read the outcome at once. `retrying`, and every status when the
result backend is not pluginpool's Redis database, come from `job_status_hooks.py`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Final, Literal

import redis

from pluginpool.policy.keys import RedisKeys

JobStatus = Literal["queued", "started", "retrying", "succeeded", "failed", "cancelled"]
STATUSES: Final[tuple[str, ...]] = ("queued", "started", "retrying", "succeeded", "failed",
                                    "cancelled")
TERMINAL: Final[frozenset[str]] = frozenset({"succeeded", "failed", "cancelled"})
LIB_SOURCE = Path(__file__).with_name("job_status_lib.lua").read_text()
"""`write_status`, prepended to every script that writes a status."""
LUA_SOURCE = LIB_SOURCE + Path(__file__).with_name("job_status.lua").read_text()


def encode_change(job_id: str, **fields: Any) -> str:
    """A change as the scripts take it: a compact JSON object without status and seq (the
    script appends those, so it decodes nothing)."""
    return json.dumps({**fields, "job_id": job_id, "at": time.time()}, separators=(",", ":"))


def decode_change(raw: bytes | str) -> dict[str, Any]:
    """One status change as stored and published (status, seq, job_id, at, ...)."""
    change: dict[str, Any] = json.loads(raw)
    return change


class JobStatusStore:
    """Writes and reads job statuses with a synchronous Redis client."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, *, ttl_s: int) -> None:
        self._client = client
        self._keys = keys
        self._ttl_s = ttl_s
        self._script = client.register_script(LUA_SOURCE)

    def set(self, job_id: str, status: JobStatus, **fields: Any) -> int:
        """Record a change; its sequence number, or 0 if it changes nothing (see the script)."""
        return int(self._script(keys=[self._keys.job_status(job_id),
                                      self._keys.job_channel(job_id)],
                                args=[status, encode_change(job_id, **fields), self._ttl_s]))

    def history(self, job_id: str) -> list[dict[str, Any]]:
        """Every change so far, oldest first (empty: unknown job, or expired)."""
        raw: dict[str, str] = self._client.hgetall(self._keys.job_status(job_id))  # type: ignore[assignment]
        return in_order(raw)

    def current(self, job_id: str) -> str | None:
        """The latest status, or None if the job is unknown here."""
        history = self.history(job_id)
        return str(history[-1]["status"]) if history else None


def in_order(stored: dict[Any, Any]) -> list[dict[str, Any]]:
    """The changes of a job's status hash (seq → change), oldest first."""
    return [decode_change(stored[seq]) for seq in sorted(stored, key=int)]
