"""The audit log: every operator action, whoever took it and however (client, CLI, HTTP).

One bounded Redis list, newest first: who (a login name, or an API token's fingerprint and
role), what (action and target), when, from where (python, cli, or the HTTP peer), and how
it ended (ok, or the error). Refused attempts are recorded too (a viewer trying to act)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict

from pluginpool.policy.errors import truncate_text
from pluginpool.policy.keys import RedisKeys
from pluginpool.tasks.registry import operator_name

MAX_TEXT_CHARS = 500
"""Longest target, origin or error text kept in one entry."""


@dataclass(frozen=True)
class Actor:
    """Who asks for an action, and from where."""

    who: str
    origin: str
    role: str = "operator"

    @classmethod
    def local(cls, origin: str = "python") -> Actor:
        return cls(who=operator_name(), origin=origin)


class AuditEntry(BaseModel):
    """One recorded action."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    at: float
    who: str
    role: str
    origin: str
    action: str
    target: str
    ok: bool
    result: dict[str, Any] = {}
    error: str | None = None


class AuditLog:
    """Append and read the audit list (LPUSH + LTRIM: bounded to `max_entries`)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, *, max_entries: int) -> None:
        self._redis = client
        self._key = keys.audit
        self._max = max_entries

    def record(self, actor: Actor, action: str, target: str, *, ok: bool,
               result: dict[str, Any] | None = None, error: str | None = None) -> AuditEntry:
        entry = AuditEntry(at=time.time(), who=truncate_text(actor.who, MAX_TEXT_CHARS),
                           role=actor.role, origin=truncate_text(actor.origin, MAX_TEXT_CHARS),
                           action=action, target=truncate_text(target, MAX_TEXT_CHARS), ok=ok,
                           result=result or {},
                           error=None if error is None else truncate_text(error, MAX_TEXT_CHARS))
        with self._redis.pipeline() as pipe:
            pipe.lpush(self._key, entry.model_dump_json())
            pipe.ltrim(self._key, 0, self._max - 1)
            pipe.execute()
        return entry

    def entries(self, *, limit: int = 100, target: str | None = None) -> list[AuditEntry]:
        """Newest first; with `target`, only the actions on it (read from the last 1,000).
        ValueError for a limit under 1 (0 read the whole log)."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        raws: list[bytes] = self._redis.lrange(  # type: ignore[assignment]
            self._key, 0, (limit if target is None else 1000) - 1)
        entries = [AuditEntry.model_validate(json.loads(raw)) for raw in raws]
        if target is not None:
            entries = [e for e in entries if e.target == target][:limit]
        return entries
