"""A small persistent key-value store per plugin instance, in Redis, with a byte quota.

Shared by every worker; the quota (`max_storage_kb`) is enforced atomically in one Lua
script, so two runs writing at once cannot both slip under it. A write to the storage of an
instance that has been unloaded is refused in the same script, so a run still in flight
during `unload` cannot leave the instance's storage behind for good.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from pluginpool.policy.errors import InstanceUnloadedError, StorageQuotaExceededError
from pluginpool.policy.keys import RedisKeys

PLUGIN_SCOPE_PREFIX = "plugin:"
"""Scope of the storage of runs without an instance (one store per plugin)."""

_SET = """
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[3]) == 0 then return {-1, 0} end
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
local old = redis.call('HGET', KEYS[1], ARGV[1])
local old_size = 0
if old then old_size = string.len(ARGV[1]) + string.len(old) end
local new_size = string.len(ARGV[1]) + string.len(ARGV[2])
if used - old_size + new_size > tonumber(ARGV[3]) then
  return {0, used - old_size + new_size}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {1, redis.call('INCRBY', KEYS[2], new_size - old_size)}
"""

_DELETE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DECRBY', KEYS[2], string.len(ARGV[1]) + string.len(old))
return 1
"""


StorageQuotaExceeded = StorageQuotaExceededError
"""The name this module used before the exception tree was one; kept for callers."""


class InstanceStorage:
    """`ctx.storage`: get, set, delete and list JSON values of one instance (or plugin)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, scope: str, *,
                 quota_bytes: int) -> None:
        self._redis = client
        self._scope = scope
        self._data = keys.storage(scope)
        self._used = keys.storage_used(scope)
        self._owner = None if scope.startswith(PLUGIN_SCOPE_PREFIX) else keys.instance(scope)
        self._quota = quota_bytes
        self._set = client.register_script(_SET)
        self._delete = client.register_script(_DELETE)

    def get(self, key: str, default: Any = None) -> Any:
        raw = self._redis.hget(self._data, key)
        return default if raw is None else json.loads(raw)

    def set(self, key: str, value: Any) -> int:
        """Store `value`; returns the bytes now used. Raises StorageQuotaExceeded, or
        InstanceUnloadedError once the instance is gone."""
        ok, used = self._set(keys=[self._data, self._used, self._owner or self._data],
                             args=[key, json.dumps(value, allow_nan=False), self._quota,
                                   "1" if self._owner else "0"])
        if ok < 0:
            raise InstanceUnloadedError(self._scope)
        if not ok:
            raise StorageQuotaExceeded(limit_bytes=self._quota, observed_bytes=int(used))
        return int(used)

    def delete(self, key: str) -> bool:
        return bool(self._delete(keys=[self._data, self._used], args=[key]))

    def keys(self) -> list[str]:
        return sorted(str(k) for k in self._redis.hkeys(self._data))

    def used_bytes(self) -> int:
        return int(self._redis.get(self._used) or 0)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Serve one request from a sandboxed run (the run has no Redis connection)."""
        action, key = request.get("action"), str(request.get("key", ""))
        try:
            if action == "get":
                return {"ok": True, "value": self.get(key)}
            if action == "set":
                return {"ok": True, "value": self.set(key, request.get("value"))}
            if action == "delete":
                return {"ok": True, "value": self.delete(key)}
            if action == "keys":
                return {"ok": True, "value": self.keys()}
        except StorageQuotaExceeded as exc:
            return {"ok": False, "quota": True, "limit_bytes": exc.limit_bytes,
                    "observed_bytes": exc.observed_bytes}
        except InstanceUnloadedError as exc:
            return {"ok": False, "quota": False, "unloaded": True, "message": str(exc)}
        except (TypeError, ValueError) as exc:
            return {"ok": False, "quota": False, "message": str(exc)}
        return {"ok": False, "quota": False, "message": f"unknown storage action {action!r}"}
