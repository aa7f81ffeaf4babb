"""Plugin instances: a loaded plugin with its initial data, visible to every worker."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis
from pydantic import BaseModel

from pluginpool.policy.errors import UnknownInstanceError
from pluginpool.policy.keys import RedisKeys

MARK_FAILED = """
if redis.call('HEXISTS', KEYS[1], 'plugin_id') == 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed', 'last_error', ARGV[1])
return 1
"""
"""An instance's failure, written only while the instance exists."""


class Instance(BaseModel):
    """One loaded instance of a plugin."""

    id: str
    plugin_id: str
    initial_data: dict[str, Any]
    created_at: float
    status: str = "ready"
    last_error: dict[str, Any] | None = None


class WarmSandboxInfo(BaseModel):
    """One warm sandbox of an instance, as the pool process holding it last published it."""

    worker: str
    pool_pid: int
    pid: int
    """The zygote's pid."""
    guardian_pid: int | None = None
    """Its parent, the pool process's zygote guardian (None: started without one, or its
    guardian is gone, or published by a worker from before guardians)."""
    since: float
    setup_ms: float
    runs: int
    rss_mb: float
    uss_mb: float | None = None
    published_at: float


class SandboxInfo(BaseModel):
    """An instance's status, resource usage (totals and last run), recent errors and its
    warm sandboxes on every worker."""

    instance_id: str
    plugin_id: str
    status: str
    created_at: float
    sandboxed: bool
    runs: int = 0
    failures: int = 0
    totals: dict[str, float] = {}
    last_run: dict[str, Any] | None = None
    recent_errors: list[dict[str, Any]] = []
    warm_sandboxes: list[WarmSandboxInfo] = []


class InstanceStore:
    """Creates, reads and removes instances in Redis."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self._redis = client
        self._keys = keys

    def create(self, plugin_id: str, initial_data: dict[str, Any]) -> Instance:
        instance = Instance(id=uuid.uuid4().hex, plugin_id=plugin_id,
                            initial_data=initial_data, created_at=time.time())
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._keys.instance(instance.id), mapping={
                "plugin_id": plugin_id,
                "initial_data": json.dumps(initial_data),
                "created_at": str(instance.created_at),
            })
            pipe.sadd(self._keys.instances_of(plugin_id), instance.id)
            pipe.execute()
        return instance

    def get(self, instance_id: str) -> Instance:
        raw = self._redis.hgetall(self._keys.instance(instance_id))
        if not raw:
            raise UnknownInstanceError(instance_id)
        last_error = raw.get("last_error")
        return Instance(id=instance_id, plugin_id=raw["plugin_id"],
                        initial_data=json.loads(raw["initial_data"]),
                        created_at=float(raw["created_at"]), status=raw.get("status", "ready"),
                        last_error=json.loads(last_error) if last_error else None)

    def mark_failed(self, instance_id: str, error: dict[str, Any]) -> None:
        """An instance of a plugin without error_recovery stops taking jobs after a failure."""
        # One step: an unload between a check and the write re-created the instance's key
        # with only these two fields (then every later write took it for a live instance).
        self._redis.eval(MARK_FAILED, 1, self._keys.instance(instance_id), json.dumps(error))

    def delete(self, instance_id: str) -> bool:
        """Remove the instance with everything kept for it: its storage (`ctx.storage`
        and its byte counter), usage totals and recent errors; nothing stays behind."""
        instance = self.get(instance_id)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._keys.instance(instance_id), self._keys.instance_usage(instance_id),
                        self._keys.storage(instance_id), self._keys.storage_used(instance_id),
                        self._keys.instance_errors(instance_id),
                        self._keys.warm_sandboxes(instance_id))
            pipe.srem(self._keys.instances_of(instance.plugin_id), instance_id)
            # Every worker retires the instance's warm sandboxes (running their teardown).
            pipe.publish(self._keys.unload_channel, instance_id)
            pipe.execute()
        return True

    def sandbox_info(self, instance_id: str, *, sandboxed: bool) -> SandboxInfo:
        instance = self.get(instance_id)
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._keys.instance_usage(instance_id))
            pipe.lrange(self._keys.instance_errors(instance_id), 0, -1)
            pipe.hvals(self._keys.warm_sandboxes(instance_id))
            usage, errors, warm = pipe.execute()
        last = usage.pop("last_run", None)
        last_logs = usage.pop("last_logs", None)  # tasks/runs.py
        runs = int(usage.pop("runs", 0))
        failures = int(usage.pop("failures", 0))
        return SandboxInfo(
            instance_id=instance_id, plugin_id=instance.plugin_id, status=instance.status,
            created_at=instance.created_at, sandboxed=sandboxed, runs=runs, failures=failures,
            totals={name: round(float(value), 3) for name, value in usage.items()},
            last_run={**json.loads(last), "logs": last_logs or ""} if last else None,
            recent_errors=[json.loads(item) for item in errors],
            warm_sandboxes=sorted((WarmSandboxInfo.model_validate_json(item) for item in warm),
                                  key=lambda info: (info.worker, info.pid)))

    def of_plugin(self, plugin_id: str) -> list[str]:
        members = self._redis.smembers(self._keys.instances_of(plugin_id))
        return sorted(str(member) for member in members)
