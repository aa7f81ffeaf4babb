"""Operator actions on plugins and jobs: one implementation behind the client, the CLI and
the HTTP API (and so the dashboard), every call recorded in the audit log.

Mixed into PluginClient (tasks/client.py), which provides what `_Client` names. Each action
takes an `Actor` (who and from where; default: this login, from python) and returns a
JSON-able dict saying what it did.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal, Protocol

import redis
from celery import Celery
from celery import states as celery_states

from pluginpool.policy.breaker import BreakerState, BreakerStatus
from pluginpool.policy.errors import ActionRefusedError, JobCancelledError
from pluginpool.tasks.audit import Actor, AuditEntry, AuditLog
from pluginpool.tasks.deadletter import DeadLetter, DeadLetterStore
from pluginpool.tasks.job_status import TERMINAL, JobStatusStore
from pluginpool.tasks.pause import Mode, Pause, all_pauses, pause_of
from pluginpool.tasks.retire import BATCH, job_id_of, queue_lists
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec

DRAIN_POLL_S = 0.2
logger = logging.getLogger("pluginpool.operations")


class Audits(Protocol):
    """What recording an action needs of the client."""

    redis: redis.Redis
    settings: Settings

    def _unavailable_as_error(self) -> AbstractContextManager[None]: ...


class _Client(Protocol):
    app: Celery
    redis: redis.Redis
    settings: Settings

    def spec(self, plugin_id: str) -> PluginSpec: ...

    def breaker(self, plugin_id: str) -> BreakerStatus: ...

    def override_breaker(self, plugin_id: str,
                         action: Literal["reset", "force_open"]) -> BreakerState: ...

    def _unavailable_as_error(self) -> AbstractContextManager[None]: ...


def _audit(client: Audits) -> AuditLog:
    return AuditLog(client.redis, client.settings.keys, max_entries=client.settings.audit_max)


def audited(client: Audits, actor: Actor | None, action: str, target: str,
             act: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `act` and record it, ok or not (the error is re-raised)."""
    who = actor or Actor.local()
    try:
        with client._unavailable_as_error():
            result = act()
    except Exception as exc:
        try:  # the action's own error is what the caller gets, even with Redis gone
            _audit(client).record(who, action, target, ok=False,
                                  error=f"{type(exc).__name__}: {exc}")
        except redis.RedisError as lost:
            logger.warning("could not audit %s %s: %r", action, target[:200], lost)
        raise
    with client._unavailable_as_error():
        _audit(client).record(who, action, target, ok=True, result=result)
    return result


MAX_JOB_ID_CHARS = 200
"""Longer is no job id (Celery's are 36 characters; a producer's own stay short)."""


class Operations:
    """Operator actions of PluginClient (which provides what `_Client` names)."""

    app: Celery
    redis: redis.Redis
    settings: Settings

    if TYPE_CHECKING:
        def spec(self, plugin_id: str) -> PluginSpec: ...

        def breaker(self, plugin_id: str) -> BreakerStatus: ...

        def override_breaker(self, plugin_id: str,
                             action: Literal["reset", "force_open"]) -> BreakerState: ...

        def _unavailable_as_error(self) -> AbstractContextManager[None]: ...

    # -- disable, enable, drain -------------------------------------------------------------

    def pause(self, plugin_id: str) -> Pause | None:
        """Why the plugin refuses submits (disabled or draining), or None."""
        with self._unavailable_as_error():
            return pause_of(self.redis, self.settings.keys, plugin_id)

    def pauses(self) -> dict[str, Pause]:
        with self._unavailable_as_error():
            return all_pauses(self.redis, self.settings.keys)

    def disable(self, plugin_id: str, *, actor: Actor | None = None) -> dict[str, Any]:
        """Refuse submits (PluginDisabledError) and stop every worker consuming the queue;
        queued jobs wait there until `enable`. Running jobs finish."""
        return self._set_pause(plugin_id, "disabled", actor=actor, action="disable")

    def enable(self, plugin_id: str, *, actor: Actor | None = None
               ) -> dict[str, Any]:
        """Undo `disable` or `drain`: submits are accepted and queued jobs run."""
        keys = self.settings.keys

        def act() -> dict[str, Any]:
            self.spec(plugin_id)
            was = pause_of(self.redis, keys, plugin_id)
            self.redis.hdel(keys.paused, plugin_id)
            self.redis.publish(keys.ops_channel, json.dumps(
                {"action": "enable", "plugin_id": plugin_id}))
            return {"plugin_id": plugin_id, "was": was.mode if was else None}
        return audited(self, actor, "enable", plugin_id, act)

    def drain(self, plugin_id: str, *, actor: Actor | None = None,
              wait_s: float | None = None) -> dict[str, Any]:
        """Refuse submits while workers finish the queue; with `wait_s`, wait up to that
        long for it to be empty. Returns the jobs still queued and whether it is empty."""
        result = self._set_pause(plugin_id, "draining", actor=actor, action="drain")
        deadline = time.monotonic() + (wait_s or 0.0)
        status = self.drain_status(plugin_id)
        while not status["drained"] and time.monotonic() < deadline:
            time.sleep(DRAIN_POLL_S)
            status = self.drain_status(plugin_id)
        return {**result, **status}

    def drain_status(self, plugin_id: str) -> dict[str, Any]:
        queued = self.queued(plugin_id)
        return {"plugin_id": plugin_id, "queued": queued, "drained": queued == 0}

    def queued(self, plugin_id: str) -> int:
        """Jobs waiting on the plugin's queue (every priority step)."""
        queue = self.spec(plugin_id).queue
        pool: Any = self.app.pool  # pooled broker connections: the dashboard asks every 2 s
        with self._unavailable_as_error(), pool.acquire(block=True) as connection:
            channel: Any = connection.default_channel
            client = channel.client
            return sum(int(client.llen(name)) for name in queue_lists(queue))

    def _set_pause(self, plugin_id: str, mode: Mode, *, actor: Actor | None,
                   action: str) -> dict[str, Any]:
        keys = self.settings.keys
        who = actor or Actor.local()

        def act() -> dict[str, Any]:
            self.spec(plugin_id)
            pause = Pause(mode=mode, by=who.who, at=time.time())
            self.redis.hset(keys.paused, plugin_id, pause.model_dump_json())
            self.redis.publish(keys.ops_channel, json.dumps(
                {"action": action, "plugin_id": plugin_id}))
            return {"plugin_id": plugin_id, "mode": mode}
        return audited(self, who, action, plugin_id, act)

    # -- purge and cancel -------------------------------------------------------------------

    def purge(self, plugin_id: str, *, actor: Actor | None = None
              ) -> dict[str, Any]:
        """Take every queued job off the plugin's queue; each one's result becomes
        JobCancelledError (reason "purged"), which its producer's `result()` raises."""
        who = actor or Actor.local()

        def act() -> dict[str, Any]:
            queue = self.spec(plugin_id).queue
            purged = 0
            statuses = JobStatusStore(self.redis, self.settings.keys,
                                      ttl_s=self.settings.result_expires_s)
            with self.app.connection_for_write() as connection:
                channel: Any = connection.default_channel
                client = channel.client
                for name in queue_lists(queue):
                    while client.llen(name):  # atomic pops: a worker may take one first
                        for raw in client.rpop(name, BATCH) or []:
                            job_id = job_id_of(raw)
                            if job_id is None:
                                continue
                            self.app.backend.mark_as_failure(job_id, JobCancelledError.of(
                                job_id, plugin_id=plugin_id, reason="purged", by=who.who))
                            statuses.set(job_id, "cancelled", plugin_id=plugin_id,
                                         reason="purged", by=who.who)
                            purged += 1
            return {"plugin_id": plugin_id, "purged": purged}
        return audited(self, who, "purge", plugin_id, act)

    def cancel(self, job_id: str, *, plugin_id: str | None = None,
               actor: Actor | None = None) -> dict[str, Any]:
        """A queued job never runs; a running one's run is killed. Its `result()` raises
        JobCancelledError at once. A job that already ended is refused."""
        who = actor or Actor.local()
        keys = self.settings.keys

        def act() -> dict[str, Any]:
            if not job_id or len(job_id) > MAX_JOB_ID_CHARS or not job_id.isprintable():
                raise ActionRefusedError(f"not a job id: {job_id[:MAX_JOB_ID_CHARS]!r}")
            statuses = JobStatusStore(self.redis, keys, ttl_s=self.settings.result_expires_s)
            known = statuses.current(job_id)
            state = self.app.AsyncResult(job_id).state
            if known in TERMINAL:
                raise ActionRefusedError(f"job {job_id} already ended ({known})")
            if state in celery_states.READY_STATES:
                raise ActionRefusedError(f"job {job_id} already ended ({state})")
            error = JobCancelledError.of(job_id, plugin_id=plugin_id, by=who.who)
            self.redis.set(keys.cancelled(job_id), json.dumps(error.info),
                           ex=self.settings.result_expires_s)
            self.app.backend.mark_as_failure(job_id, error)
            statuses.set(job_id, "cancelled", plugin_id=plugin_id, by=who.who)
            listeners = self.redis.publish(keys.cancel_channel, job_id)
            outcome: dict[str, Any] = {"job_id": job_id, "was": known or "unknown",
                                       "workers_told": int(listeners)}
            if known is None:  # a typo, or a plain Celery producer's job not yet started
                outcome["note"] = ("no record of this job: never submitted by a pluginpool "
                                   "producer, queued by a plain Celery one, or its record "
                                   "expired (PLUGINPOOL_RESULT_EXPIRES_S); marked "
                                   "cancelled anyway")
            return outcome
        return audited(self, who, "cancel", job_id, act)

    # -- breaker ----------------------------------------------------------------------------

    def reset_breaker(self, plugin_id: str, *, actor: Actor | None = None
                      ) -> dict[str, Any]:
        return audited(self, actor, "breaker-reset", plugin_id, lambda: {
            "plugin_id": plugin_id, "state": str(self.override_breaker(plugin_id, "reset"))})

    def force_open_breaker(self, plugin_id: str, *, actor: Actor | None = None
                           ) -> dict[str, Any]:
        return audited(self, actor, "breaker-force-open", plugin_id, lambda: {
            "plugin_id": plugin_id,
            "state": str(self.override_breaker(plugin_id, "force_open"))})

    # -- dead letters -----------------------------------------------------------------------

    def dead_letters(self, *, limit: int = 100, offset: int = 0
                     ) -> tuple[int, list[DeadLetter]]:
        """How many there are, and a page of them, newest first."""
        store = DeadLetterStore(self.redis, self.settings.keys)
        with self._unavailable_as_error():
            return store.count(), store.list(limit=limit, offset=offset)

    def requeue_dead_letter(self, entry_id: str, *, actor: Actor | None = None
                            ) -> dict[str, Any]:
        store = DeadLetterStore(self.redis, self.settings.keys)
        return audited(self, actor, "deadletter-requeue", entry_id, lambda: {
            "id": entry_id, "queue": store.requeue(entry_id).queue})

    def discard_dead_letter(self, entry_id: str, *, actor: Actor | None = None
                            ) -> dict[str, Any]:
        store = DeadLetterStore(self.redis, self.settings.keys)

        def act() -> dict[str, Any]:
            store.discard(entry_id)
            return {"id": entry_id}
        return audited(self, actor, "deadletter-discard", entry_id, act)

    # -- the log ----------------------------------------------------------------------------

    def audit_log(self, *, limit: int = 100, target: str | None = None
                  ) -> list[AuditEntry]:
        with self._unavailable_as_error():
            return _audit(self).entries(limit=limit, target=target)

    def record_refusal(self, actor: Actor, action: str, target: str, reason: str
                       ) -> None:
        """A refused attempt (e.g. a viewer token trying to act), for the audit log."""
        _audit(self).record(actor, action, target, ok=False, error=reason)

