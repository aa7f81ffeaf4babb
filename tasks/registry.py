"""The plugin registry in Redis: every producer, worker and aggregator sees the same specs.

Publishing is all-or-nothing (one MULTI/EXEC guarded by WATCH) and versioned: each change
of a spec bumps its `revision` and keeps the previous specs in a bounded history.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from pluginpool.policy.errors import ManifestError, ManifestIssue, UnknownPluginError
from pluginpool.policy.keys import RedisKeys
from pluginpool.tasks.manifest import spec_issues
from pluginpool.tasks.spec import PluginSpec

HISTORY_LENGTH = 20


class Registry:
    """Reads and publishes plugin specs."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, *, visibility_timeout_s: int) -> None:
        self._redis = client
        self._keys = keys
        self._visibility_timeout_s = visibility_timeout_s

    def publish(self, specs: list[PluginSpec], *, source: str = "<python>") -> list[PluginSpec]:
        """Publish specs atomically; unchanged specs keep their revision."""
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self._keys.specs)  # type: ignore[no-untyped-call]
                    current = {s.id: s for s in self._decode_all(pipe.hgetall(self._keys.specs))}
                    self._check(specs, current, source)
                    published = []
                    pipe.multi()
                    for spec in specs:
                        old = current.get(spec.id)
                        if old is not None and old.content_equals(spec):
                            published.append(old)
                            continue
                        new = spec.model_copy(update={"revision": (old.revision if old else 0) + 1})
                        pipe.hset(self._keys.specs, spec.id, new.model_dump_json())
                        if old is not None:
                            history = self._keys.spec_history(spec.id)
                            pipe.lpush(history, old.model_dump_json())
                            pipe.ltrim(history, 0, HISTORY_LENGTH - 1)
                        published.append(new)
                    pipe.execute()
                    return published
                except redis.WatchError:
                    time.sleep(0.01)

    def _check(self, specs: list[PluginSpec], current: dict[str, PluginSpec], source: str) -> None:
        known = set(current) | {spec.id for spec in specs}
        issues = []
        for spec in specs:
            issues.extend(spec_issues(spec, source))
            if spec.fallback and spec.fallback.plugin and spec.fallback.plugin not in known:
                issues.append(ManifestIssue(
                    file=source, plugin_id=spec.id, field="fallback.plugin",
                    problem=f"{spec.fallback.plugin!r} is neither registered nor in the manifest"))
            hard_s = spec.resource_limits.hard_time_limit_s
            if hard_s >= self._visibility_timeout_s:
                issues.append(ManifestIssue(
                    file=source, plugin_id=spec.id, field="resource_limits.timeout_ms",
                    problem=(f"hard time limit {hard_s:.0f} s is not below the broker visibility"
                             f" timeout {self._visibility_timeout_s} s: the job would be"
                             " delivered twice; raise PLUGINPOOL_VISIBILITY_TIMEOUT_S")))
            cooldown_s = spec.isolation.restart_cooldown_ms / 1000
            if spec.isolation.auto_restart and cooldown_s >= self._visibility_timeout_s:
                issues.append(ManifestIssue(
                    file=source, plugin_id=spec.id, field="isolation.restart_cooldown_ms",
                    problem=(f"restart cooldown {cooldown_s:.0f} s is not below the broker"
                             f" visibility timeout {self._visibility_timeout_s} s: a waiting"
                             " restart would be delivered twice")))
        if issues:
            raise ManifestError(issues)

    def get(self, plugin_id: str) -> PluginSpec:
        raw = self._redis.hget(self._keys.specs, plugin_id)
        if raw is None:
            raise UnknownPluginError(plugin_id)
        return PluginSpec.model_validate_json(raw)

    def all(self) -> list[PluginSpec]:
        return sorted(self._decode_all(self._redis.hgetall(self._keys.specs)), key=lambda s: s.id)

    def history(self, plugin_id: str) -> list[PluginSpec]:
        """Earlier revisions, newest first."""
        raw = self._redis.lrange(self._keys.spec_history(plugin_id), 0, -1)
        return [PluginSpec.model_validate_json(item) for item in raw]

    @staticmethod
    def _decode_all(raw: Any) -> list[PluginSpec]:
        return [PluginSpec.model_validate_json(value) for value in raw.values()]


class SpecCache:
    """A per-process cache of specs for the hot path, refreshed after `ttl_s` or on demand."""

    def __init__(self, registry: Registry, *, ttl_s: float) -> None:
        self._registry = registry
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, PluginSpec]] = {}

    def get(self, plugin_id: str, *, min_revision: int = 0) -> PluginSpec:
        """The spec, fetched again if older than `ttl_s` or than `min_revision`."""
        entry = self._entries.get(plugin_id)
        now = time.monotonic()
        if entry is not None:
            fetched_at, spec = entry
            if now - fetched_at < self._ttl_s and spec.revision >= min_revision:
                return spec
        spec = self._registry.get(plugin_id)
        self._entries[plugin_id] = (now, spec)
        return spec

    def invalidate(self, plugin_id: str | None = None) -> None:
        if plugin_id is None:
            self._entries.clear()
        else:
            self._entries.pop(plugin_id, None)
