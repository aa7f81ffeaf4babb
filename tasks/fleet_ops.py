"""The client's operations on a live fleet: unregister, revisions, rollback, discovery.

Mixed into PluginClient (tasks/client.py), which provides what `_Client` names; kept here
so that the client module stays about producing jobs.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import redis
from celery import Celery

from pluginpool.tasks.audit import Actor
from pluginpool.tasks.discovery import DiscoveredPlugin, discover, select
from pluginpool.tasks.operations import audited
from pluginpool.tasks.registry import Registry, RevisionRecord, SpecCache, operator_name
from pluginpool.tasks.retire import fail_queued_jobs
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec


class _Client(Protocol):
    app: Celery
    registry: Registry
    _specs: SpecCache
    redis: redis.Redis
    settings: Settings

    def register(self, source: str | Path | PluginSpec | Iterable[PluginSpec], *,
                 by: str | None = None) -> list[PluginSpec]: ...

    def _unavailable_as_error(self) -> AbstractContextManager[None]: ...

    def _trial_new_revisions(self, changed: list[PluginSpec]) -> None: ...


class FleetOperations:
    """Registry operations of PluginClient beyond `register`."""

    def unregister(self: _Client, plugin_id: str, *, by: str | None = None,
                   actor: Actor | None = None) -> int:
        """Remove a plugin: new submits raise PluginUnregisteredError, workers stop
        consuming its queue, and each job still queued fails with a `dependency` error
        (jobs already running finish). Returns how many queued jobs were failed."""
        who = actor or Actor(who=by or operator_name(), origin="python")

        def act() -> dict[str, Any]:
            old = self.registry.unregister(plugin_id, by=who.who)
            self._specs.invalidate(plugin_id)
            return {"plugin_id": plugin_id, "queued_jobs_failed": fail_queued_jobs(
                self.app, plugin_id=plugin_id, queue=old.queue, revision=old.revision)}
        return int(audited(self, who, "unregister", plugin_id, act)["queued_jobs_failed"])

    def revisions(self: _Client, plugin_id: str) -> list[RevisionRecord]:
        """The plugin's revisions, oldest first: version, source hash, when, by whom."""
        with self._unavailable_as_error():
            return self.registry.revisions(plugin_id)

    def rollback(self: _Client, plugin_id: str, *, to: int | None = None,
                 by: str | None = None, actor: Actor | None = None) -> PluginSpec:
        """Make an earlier revision's content current again (the previous one by default),
        as a new revision: history stays append-only. Returns the new current spec."""
        who = actor or Actor(who=by or operator_name(), origin="python")
        rolled: list[PluginSpec] = []

        changed: list[PluginSpec] = []

        def act() -> dict[str, Any]:
            rolled.append(self.registry.rollback(plugin_id, to=to, by=who.who,
                                                 changed=changed))
            self._specs.invalidate(plugin_id)
            return {"plugin_id": plugin_id, "to": to, "revision": rolled[0].revision}
        audited(self, who, "rollback", plugin_id, act)
        self._trial_new_revisions(changed)
        return rolled[0]

    def discover(self, paths: list[str] | None = None) -> list[DiscoveredPlugin]:
        """Plugins declared by installed distributions (entry points `pluginpool.plugins`)."""
        return discover(paths)

    def register_entry_points(self: _Client, names: list[str] | None = None, *,
                              paths: list[str] | None = None) -> list[PluginSpec]:
        """Register the discovered plugins (all, or those named); all or nothing."""
        return self.register(select(discover(paths), names))
