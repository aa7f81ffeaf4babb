"""The plugin registry in Redis: every producer, worker and aggregator sees the same specs.

Publishing is all-or-nothing (one MULTI/EXEC guarded by WATCH) and versioned: each change
of a spec bumps its `revision`, keeps the previous specs in a bounded history, appends a
record (version, source hash, when, by whom) to the plugin's revision log, and publishes a
change event on `keys.registry_channel` in the same transaction, so an event never
arrives before the change it announces. History is append-only: a rollback publishes the
old content as a new revision; unregistering leaves the history and a tombstone.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import redis
from pydantic import BaseModel

from pluginpool.policy.errors import (
    ManifestError,
    ManifestIssue,
    PluginUnregisteredError,
    RevisionNotFoundError,
    UnknownPluginError,
)
from pluginpool.policy.keys import RedisKeys
from pluginpool.policy.redis_text import as_text
from pluginpool.tasks.manifest import spec_issues
from pluginpool.tasks.spec import PluginSpec

HISTORY_LENGTH = 20
"""Earlier spec contents kept per plugin: the revisions a rollback can reach."""
REVISION_LOG_LENGTH = 200
"""Revision records kept per plugin (records are small; contents are in the history)."""
SNAPSHOT_MAX_SPECS = 50_000
"""A following spec cache holds every spec's stored JSON when there are at most this many
(10,000 plugins of 900 bytes each: about 10 MB); beyond, it reads each plugin's as it is
first used."""

Action = Literal["register", "rollback", "unregister"]


class RevisionRecord(BaseModel):
    """One line of a plugin's revision log."""

    revision: int
    version: str
    action: Action = "register"
    source_sha256: str | None = None
    at: float | None = None
    by: str | None = None
    restored_revision: int | None = None
    """For a rollback: the revision whose content became current again."""


class RegistryEvent(BaseModel):
    """What `keys.registry_channel` carries (JSON)."""

    action: Action
    plugin_id: str
    revision: int
    at: float


class Registry:
    """Reads and publishes plugin specs."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, *, visibility_timeout_s: int) -> None:
        self._redis = client
        self._keys = keys
        self._visibility_timeout_s = visibility_timeout_s

    def publish(self, specs: list[PluginSpec], *, source: str = "<python>", by: str | None = None,
                action: Action = "register", restored_revision: int | None = None,
                changed: list[PluginSpec] | None = None) -> list[PluginSpec]:
        """Publish specs atomically; unchanged specs keep their revision. `changed` gets the
        specs that got a new revision."""
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self._keys.specs,  # type: ignore[no-untyped-call]
                               self._keys.unregistered)
                    current = {s.id: s for s in self._decode_all(pipe.hgetall(self._keys.specs))}
                    self._check(specs, current, source)
                    # An id registered again after `unregister` goes on from its last revision:
                    # numbered from 1 again, workers took the new code for the old revision
                    # they had set up (and served the old code as it).
                    gone = dict(zip([spec.id for spec in specs], pipe.hmget(
                        self._keys.unregistered, [spec.id for spec in specs]) if specs else [],
                        strict=True))
                    published = []
                    pipe.multi()
                    for spec in specs:
                        old = current.get(spec.id)
                        if old is not None and old.content_equals(spec):
                            published.append(old)
                            continue
                        last = old.revision if old else int(gone.get(spec.id) or 0)
                        new = spec.model_copy(update={"revision": last + 1})
                        pipe.hset(self._keys.specs, spec.id, new.model_dump_json())
                        pipe.hdel(self._keys.unregistered, spec.id)
                        if old is not None:
                            self._push_history(pipe, old)
                        self._record(pipe, new, action=action, by=by,
                                     restored_revision=restored_revision)
                        published.append(new)
                    pipe.execute()
                    if changed is not None:
                        changed.extend(spec for spec in published
                                       if spec.id not in current
                                       or spec.revision != current[spec.id].revision)
                    return published
                except redis.WatchError:
                    time.sleep(0.01)

    def unregister(self, plugin_id: str, *, by: str | None = None) -> PluginSpec:
        """Remove a plugin: new jobs are refused (PluginUnregisteredError); its history stays."""
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self._keys.specs)  # type: ignore[no-untyped-call]
                    raw = pipe.hget(self._keys.specs, plugin_id)
                    if raw is None:
                        raise UnknownPluginError(plugin_id)
                    old = PluginSpec.model_validate_json(raw)
                    pipe.multi()
                    pipe.hdel(self._keys.specs, plugin_id)
                    pipe.hset(self._keys.unregistered, plugin_id, old.revision)
                    self._push_history(pipe, old)
                    self._record(pipe, old, action="unregister", by=by)
                    pipe.execute()
                    return old
                except redis.WatchError:
                    time.sleep(0.01)

    def rollback(self, plugin_id: str, *, to: int | None = None, by: str | None = None,
                 changed: list[PluginSpec] | None = None) -> PluginSpec:
        """Make an earlier revision's content current again, as a new revision (the
        previous one by default). Returns the spec now current."""
        current = self.get(plugin_id)
        history = self.history(plugin_id)
        candidates = [old for old in history if not old.content_equals(current)]
        if to is not None:
            candidates = [old for old in history if old.revision == to]
        if not candidates:
            raise RevisionNotFoundError(plugin_id, to, available=[h.revision for h in history])
        target = candidates[0]
        [published] = self.publish([target.model_copy(update={"revision": 0})],
                                   source=f"rollback of {plugin_id}", by=by, action="rollback",
                                   restored_revision=target.revision, changed=changed)
        return published

    def _push_history(self, pipe: Any, old: PluginSpec) -> None:
        history = self._keys.spec_history(old.id)
        pipe.lpush(history, old.model_dump_json())
        pipe.ltrim(history, 0, HISTORY_LENGTH - 1)

    def _record(self, pipe: Any, spec: PluginSpec, *, action: Action, by: str | None,
                restored_revision: int | None = None) -> None:
        now = time.time()
        record = RevisionRecord(
            revision=spec.revision, version=spec.version, action=action, at=now, by=by,
            source_sha256=spec.artifact.sha256 if spec.artifact else None,
            restored_revision=restored_revision)
        log = self._keys.spec_revisions(spec.id)
        pipe.rpush(log, record.model_dump_json())
        pipe.ltrim(log, -REVISION_LOG_LENGTH, -1)
        event = RegistryEvent(action=action, plugin_id=spec.id, revision=spec.revision, at=now)
        pipe.incr(self._keys.registry_version)
        pipe.publish(self._keys.registry_channel, event.model_dump_json())

    def _check(self, specs: list[PluginSpec], current: dict[str, PluginSpec], source: str) -> None:
        known = set(current) | {spec.id for spec in specs}
        issues = []
        for spec in specs:
            issues.extend(spec_issues(spec, source))
            if spec.fallback and spec.fallback.plugin and spec.fallback.plugin not in known:
                issues.append(ManifestIssue(
                    file=source, plugin_id=spec.id, field="fallback.plugin",
                    problem=f"{spec.fallback.plugin!r} is neither registered nor in the manifest"))
            hard_s = spec.deadlines.celery_hard_s
            if hard_s >= self._visibility_timeout_s:
                limits = spec.resource_limits
                sandboxed = spec.isolation.sandboxed
                fields = ("resource_limits.timeout_ms + setup_timeout_ms" if sandboxed
                          else "resource_limits.timeout_ms")
                issues.append(ManifestIssue(
                    file=source, plugin_id=spec.id, field=fields,
                    problem=(f"hard time limit {hard_s:.0f} s (timeout_ms {limits.timeout_ms}"
                             + (f" + setup_timeout_ms {limits.setup_timeout_ms}"
                                if sandboxed else "")
                             + f", plus margins) is not below the broker visibility timeout"
                             f" {self._visibility_timeout_s} s: the job would be delivered"
                             " twice; lower them or raise PLUGINPOOL_VISIBILITY_TIMEOUT_S")))
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
            last = self._redis.hget(self._keys.unregistered, plugin_id)
            if last is not None:
                raise PluginUnregisteredError(plugin_id, last_revision=int(last))
            raise UnknownPluginError(plugin_id)
        return PluginSpec.model_validate_json(raw)

    def all(self) -> list[PluginSpec]:
        return sorted(self._decode_all(self._redis.hgetall(self._keys.specs)), key=lambda s: s.id)

    def page(self, *, offset: int, limit: int | None) -> tuple[list[PluginSpec], int]:
        """A page of specs in id order and how many there are: reads the ids, then only the
        page's specs, so a person's view of 10,000 plugins decodes what it shows."""
        ids = sorted(as_text(key) for key in self._redis.hkeys(self._keys.specs))
        chosen = ids[offset:] if limit is None else ids[offset:offset + limit]
        if not chosen:
            return [], len(ids)
        raws = self._redis.hmget(self._keys.specs, chosen)
        return [self._decode(key, raw) for key, raw in zip(chosen, raws, strict=True)
                if raw is not None], len(ids)

    def raw_specs(self, *, limit: int) -> dict[str, bytes | str] | None:
        """Every spec's stored JSON by plugin id (decode with `_decode`), or None when more
        than `limit` are registered."""
        if int(self._redis.hlen(self._keys.specs)) > limit:
            return None
        return {as_text(key): raw for key, raw in self._redis.hgetall(self._keys.specs).items()}

    def version(self) -> int:
        """The registry's change counter (see RedisKeys.registry_version)."""
        return int(self._redis.get(self._keys.registry_version) or 0)

    def unregistered(self) -> dict[str, int]:
        """Unregistered plugins (not registered again since) and their last revision."""
        raw = self._redis.hgetall(self._keys.unregistered)
        return {as_text(key): int(value) for key, value in raw.items()}

    def history(self, plugin_id: str) -> list[PluginSpec]:
        """Earlier revisions, newest first."""
        raw = self._redis.lrange(self._keys.spec_history(plugin_id), 0, -1)
        return [PluginSpec.model_validate_json(item) for item in raw]

    def revisions(self, plugin_id: str) -> list[RevisionRecord]:
        """The plugin's revision log, oldest first (for plugins registered before the log
        existed: rebuilt from the history, without when and by whom)."""
        raw = self._redis.lrange(self._keys.spec_revisions(plugin_id), 0, -1)
        if raw:
            return [RevisionRecord.model_validate_json(item) for item in raw]
        specs = list(reversed(self.history(plugin_id)))
        current = self._redis.hget(self._keys.specs, plugin_id)
        if current is not None:
            specs.append(PluginSpec.model_validate_json(current))
        if not specs:
            raise UnknownPluginError(plugin_id)
        return [RevisionRecord(revision=spec.revision, version=spec.version,
                               source_sha256=spec.artifact.sha256 if spec.artifact else None)
                for spec in specs]

    def _decode_all(self, raw: Any) -> list[PluginSpec]:
        return [self._decode(as_text(key), value) for key, value in raw.items()]

    def _decode(self, plugin_id: str, raw: bytes | str) -> PluginSpec:
        """A spec from its stored JSON, decoded (and validated) once per revision: reading
        every spec again must not cost a full validation of 10,000 of them each time."""
        memo: dict[str, tuple[bytes | str, PluginSpec]] = self.__dict__.setdefault("_memo", {})
        cached = memo.get(plugin_id)
        if cached is not None and cached[0] == raw:
            return cached[1]
        spec = PluginSpec.model_validate_json(raw)
        memo[plugin_id] = (raw, spec)
        return spec


def operator_name() -> str:
    """Who is changing the registry, for the revision log: user@host as far as known."""
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return f"?@{socket.gethostname()}"


def parse_event(data: bytes | str) -> RegistryEvent | None:
    """A registry event from the channel, or None for something else on it."""
    try:
        return RegistryEvent.model_validate(json.loads(data))
    except ValueError:
        return None


class SpecCache:
    """A per-process cache of specs for the hot path, refreshed after `ttl_s`, when a newer
    revision is asked for, or when `generation()` changes (a worker bumps it, in memory
    shared with its pool children, on every registry change it hears of).

    A cache that follows registry changes (`follow`: a producer hears events, a worker's
    pool process sees the generation move) also holds every spec's stored JSON from one
    bulk read (the snapshot), decoded as each plugin is first used: with jobs spread over
    10,000 plugins nearly every submit met a plugin new to it, and in a long-running
    worker every job found its plugin's entry past the age bound, and each cost a registry
    read. Events drop a plugin from the snapshot as from the cache, a new generation the
    whole snapshot; once `ttl_s` old, the snapshot is kept if the registry's change counter
    did not move (one GET) and read again in bulk if it did."""

    def __init__(self, registry: Registry, *, ttl_s: float,
                 generation: Callable[[], int] | None = None) -> None:
        self._registry = registry
        self._ttl_s = ttl_s
        self._generation = generation or (lambda: 0)
        self._entries: dict[str, tuple[float, int, PluginSpec]] = {}
        self._bulk = False
        self._snapshot: dict[str, bytes | str] | None = None
        self._snapshot_version = -1
        self._snapshot_at = float("-inf")
        self._snapshot_generation = 0
        self._invalidations = 0
        """Counts `invalidate` calls (a producer's subscriber thread makes them)."""

    def get(self, plugin_id: str, *, min_revision: int = 0) -> PluginSpec:
        """The spec, fetched again if stale (see the class) or older than `min_revision`."""
        entry = self._entries.get(plugin_id)
        now = time.monotonic()
        generation = self._generation()
        if entry is not None:
            fetched_at, seen, spec = entry
            if (now - fetched_at < self._ttl_s and seen == generation
                    and spec.revision >= min_revision):
                return spec
        found = self._from_snapshot(plugin_id, now, generation) if self._bulk else None
        if found is not None and found.revision >= min_revision:
            # As old as the snapshot's last check, not as the lookup: a spec is never kept
            # longer than `ttl_s` past the moment the registry was last seen unchanged.
            self._entries[plugin_id] = (self._snapshot_at, generation, found)
            return found
        spec = self._registry.get(plugin_id)
        self._entries[plugin_id] = (now, generation, spec)
        return spec

    def _from_snapshot(self, plugin_id: str, now: float, generation: int
                       ) -> PluginSpec | None:
        if generation != self._snapshot_generation:  # the worker heard of a change
            self._snapshot, self._snapshot_at = None, float("-inf")
            self._snapshot_generation = generation
        if now - self._snapshot_at >= self._ttl_s:
            version = self._registry.version()  # read first: a change after it is seen next
            if self._snapshot is None or version != self._snapshot_version:
                heard = self._invalidations
                snapshot = self._registry.raw_specs(limit=SNAPSHOT_MAX_SPECS)
                if heard != self._invalidations:
                    # A change was heard of while the read was under way: what it read of
                    # that plugin may be older than the change. Not kept; read again later.
                    return None
                self._snapshot = snapshot
                self._snapshot_version = version
            self._snapshot_at = now
        snapshot = self._snapshot
        raw = snapshot.get(plugin_id) if snapshot is not None else None
        return None if raw is None else self._registry._decode(plugin_id, raw)

    def prime(self, specs: Iterable[PluginSpec]) -> None:
        """Hold these specs as if just fetched. A worker primes its cache with the specs it
        read at start, before its pool forks: every pool process then starts with them,
        instead of one registry read per plugin on its first job of each."""
        now, generation = time.monotonic(), self._generation()
        for spec in specs:
            self._entries[spec.id] = (now, generation, spec)

    def follow(self, ttl_s: float) -> None:
        """Changes now drop entries as they happen (events, or the generation): keep them
        up to `ttl_s`, and hold the snapshot (see the class). A short age bound made every
        job of a large fleet a registry read (1,000 plugins: each plugin's entry was older
        than 5 s at nearly every submit)."""
        self._ttl_s = max(self._ttl_s, ttl_s)
        self._bulk = True

    def invalidate(self, plugin_id: str | None = None) -> None:
        self._invalidations += 1
        if plugin_id is None:
            self._entries.clear()
            self._snapshot, self._snapshot_at = None, float("-inf")
        else:
            self._entries.pop(plugin_id, None)
            snapshot = self._snapshot
            if snapshot is not None:
                snapshot.pop(plugin_id, None)
