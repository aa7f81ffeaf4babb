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


class Instance(BaseModel):
    """One loaded instance of a plugin."""

    id: str
    plugin_id: str
    initial_data: dict[str, Any]
    created_at: float
    status: str = "ready"
    last_error: dict[str, Any] | None = None


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
        key = self._keys.instance(instance_id)
        if self._redis.exists(key):
            self._redis.hset(key, mapping={"status": "failed", "last_error": json.dumps(error)})

    def delete(self, instance_id: str) -> bool:
        instance = self.get(instance_id)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._keys.instance(instance_id))
            pipe.srem(self._keys.instances_of(instance.plugin_id), instance_id)
            pipe.execute()
        return True

    def of_plugin(self, plugin_id: str) -> list[str]:
        members = self._redis.smembers(self._keys.instances_of(plugin_id))
        return sorted(str(member) for member in members)
