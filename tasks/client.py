"""The producer's API: register plugins, load instances, submit jobs and wait for them."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import redis
from celery import Celery
from kombu.exceptions import OperationalError
from kombu.utils.uuid import uuid

from pluginpool.policy.breaker import (
    UNGUARDED,
    BreakerState,
    BreakerStatus,
    BreakerUnavailable,
    CircuitBreaker,
)
from pluginpool.policy.errors import (
    BreakerUnavailableError,
    BrokerUnavailableError,
    CircuitOpenError,
    InstanceFailedError,
    InvalidPayloadError,
    ManifestError,
    PayloadTooDeepError,
    PayloadTooLargeError,
    PluginDisabledError,
    PluginUnregisteredError,
    UnknownInstanceError,
    UnknownOperationError,
)
from pluginpool.policy.health import PluginHealth
from pluginpool.tasks.app import create_app
from pluginpool.tasks.artifacts import ArtifactStore, publish_sources
from pluginpool.tasks.breaker_view import BreakerView
from pluginpool.tasks.fleet_ops import FleetOperations
from pluginpool.tasks.health import HealthReader
from pluginpool.tasks.instances import Instance, InstanceStore, SandboxInfo
from pluginpool.tasks.job_watch import JobWatcher
from pluginpool.tasks.jobs import FallbackJob, Job
from pluginpool.tasks.manifest import load_manifest, spec_issues
from pluginpool.tasks.operations import Operations
from pluginpool.tasks.pause import pause_of
from pluginpool.tasks.payload import nesting_depth
from pluginpool.tasks.redis_conn import redis_client
from pluginpool.tasks.registry import Registry, SpecCache, operator_name
from pluginpool.tasks.result_store import same_database
from pluginpool.tasks.routing import REVISION_HEADER, TRIAL_HEADER
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec
from pluginpool.tasks.submit_step import SUBMIT_HEADER, SubmitStep
from pluginpool.tasks.subscriptions import Handler, Subscriptions
from pluginpool.tasks.transport import SENTINEL_TRANSPORT_PATH, TRANSPORT_PATH

logger = logging.getLogger("pluginpool.client")
MAX_FALLBACK_DEPTH = 3
FOLLOWED_SPEC_TTL_S = 60.0
"""How long a producer that follows registry events keeps a spec at most: events drop it
at once, and every entry when the subscription fails; the bound covers an event lost in
the instant the subscription reconnects. A stale spec here is harmless to a job: workers
run the newest revision they know of and refuse an unregistered plugin's job, typed."""


class PluginClient(FleetOperations, Operations):
    """One producer's handle on pluginpool. Thread-safe for submit; cheap to keep around."""

    def __init__(self, settings: Settings, *, app: Celery | None = None,
                 client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.app = app or create_app(settings)
        self.redis = client or redis_client(settings)
        self.registry = Registry(self.redis, settings.keys,
                                 visibility_timeout_s=settings.visibility_timeout_s)
        self._specs = SpecCache(self.registry, ttl_s=settings.spec_cache_ttl_s)
        self.artifacts = ArtifactStore.from_settings(settings)
        self._following_registry = False
        self.instances = InstanceStore(self.redis, settings.keys)
        self.breakers = CircuitBreaker(self.redis, settings.keys,
                                       fail_mode=settings.breaker_fail_mode)
        self._breaker_view = BreakerView(
            cache_ms=settings.breaker_gate_cache_ms,
            follow=lambda handler: self._subscriptions.add(settings.keys.breaker_channel, "*",
                                                           handler))
        self.health_reader = HealthReader(self.redis, settings.keys,
                                          thresholds=settings.health,
                                          heartbeat_s=settings.worker_heartbeat_s)
        self._job_watcher: JobWatcher | None = None
        self._subscriptions = Subscriptions(
            self.redis, [settings.keys.error_channel, settings.keys.breaker_channel,
                         settings.keys.registry_channel])

    @classmethod
    def from_env(cls, **overrides: Any) -> PluginClient:
        return cls(Settings.from_env(**overrides))

    # -- registry -----------------------------------------------------------------------

    def register(self, source: str | Path | PluginSpec | Iterable[PluginSpec], *,
                 by: str | None = None) -> list[PluginSpec]:
        """Publish specs from a TOML manifest path, one spec, or several; all or nothing.
        A spec with a `source` has its code built and published first (tasks/artifacts.py);
        `by` (default: user@host) goes into the revision log."""
        if isinstance(source, str | Path):
            specs, origin = load_manifest(source), str(source)
        elif isinstance(source, PluginSpec):
            specs, origin = [source], "<python>"
        else:
            specs, origin = list(source), "<python>"
        issues = [issue for spec in specs for issue in spec_issues(spec, origin)]
        if issues:  # e.g. a spec built with model_copy(update=...), which skips validation
            raise ManifestError(issues)
        specs = [spec.with_defaults(limits=self.settings.default_limits,
                                    isolation=self.settings.default_isolation,
                                    breaker=self.settings.default_breaker)
                 for spec in specs]
        changed: list[PluginSpec] = []
        with self._unavailable_as_error():
            specs = publish_sources(specs, self.artifacts)
            published = self.registry.publish(specs, source=origin, by=by or operator_name(),
                                              changed=changed)
        for spec in published:  # the others' cached specs and the snapshot stay good
            self._specs.invalidate(spec.id)
        self._trial_new_revisions(changed)
        return published

    def _trial_new_revisions(self, changed: list[PluginSpec]) -> None:
        """An open breaker (not forced by an operator) of a plugin that got a new revision
        goes half-open at once: what it judged was the old code, and its trials run the new
        one (a fix waited out the old code's backoff). The registration stands if Redis
        fails here (logged): the breaker then opens and waits as before."""
        if not self.settings.breaker_enabled:
            return
        for spec in changed:
            try:
                self.breakers.override(spec.id, spec.breaker, default_open_ms=spec.default_open_ms,
                                       action="trial")
            except redis.RedisError as exc:
                logger.warning("new revision of %s: its breaker not moved to half-open: %r",
                               spec.id, exc)

    def plugins(self) -> list[PluginSpec]:
        with self._unavailable_as_error():
            return self.registry.all()

    def spec(self, plugin_id: str) -> PluginSpec:
        if not self._following_registry:
            # Registry events drop cached specs at once, so a new revision (or an
            # unregister) reaches this producer's next submit, not one spec_cache_ttl_s later.
            self._following_registry = True
            with self._unavailable_as_error():
                self._subscriptions.on_gap(self._specs.invalidate)
                self._subscriptions.add(self.settings.keys.registry_channel, "*",
                                        lambda event: self._specs.invalidate(event["plugin_id"]))
            self._specs.follow(FOLLOWED_SPEC_TTL_S)
        with self._unavailable_as_error():
            return self._specs.get(plugin_id)

    # -- instances ----------------------------------------------------------------------

    def load(self, plugin_id: str, initial_data: dict[str, Any] | None = None) -> str:
        """Create a plugin instance; its `initial_data` reaches every run as ctx.initial_data."""
        self.spec(plugin_id)
        data: Any = {} if initial_data is None else initial_data
        if not isinstance(data, dict):
            raise InvalidPayloadError(
                plugin_id, f"must be a JSON object, not {type(data).__name__}",
                field="initial_data")
        self._encode(plugin_id, data, field="initial_data")
        with self._unavailable_as_error():
            return self.instances.create(plugin_id, data).id

    def instance(self, instance_id: str) -> Instance:
        with self._unavailable_as_error():
            return self.instances.get(instance_id)

    def sandbox_info(self, instance_id: str) -> SandboxInfo:
        """The instance's status, resource usage (totals and last run) and recent errors."""
        with self._unavailable_as_error():
            instance = self.instances.get(instance_id)
            try:
                sandboxed = self.spec(instance.plugin_id).isolation.sandboxed
            except PluginUnregisteredError:  # the instance is still there to be looked at:
                history = self.registry.history(instance.plugin_id)  # its last revision's
                sandboxed = history[0].isolation.sandboxed if history else True
            return self.instances.sandbox_info(instance_id, sandboxed=sandboxed)

    def unload(self, instance_id: str) -> None:
        with self._unavailable_as_error():
            self.instances.delete(instance_id)

    # -- jobs ---------------------------------------------------------------------------

    def submit(self, plugin_id: str, payload: Any = None, *, instance_id: str | None = None,
               operation: str = "run") -> Job | FallbackJob:
        """Enqueue one job and return at once. Bad input raises; nothing is enqueued then.

        An operator's pause refuses it (PluginDisabledError). The plugin's breaker is
        consulted (no round trip of its own while it is closed: tasks/breaker_view.py); the
        pause check and the `queued` status travel in the publish (tasks/submit_step.py), so
        a submit costs no round trip beyond Celery's own. Refused by the breaker: the plugin's
        fallback applies (a `FallbackJob` with a fixed value, or a `Job` of the fallback
        plugin, both with `is_fallback = True`); with no fallback, CircuitOpenError.
        `operation` names one of the manifest's `operations` (UnknownOperationError if not).
        """
        return self._submit(plugin_id, payload, instance_id=instance_id, depth=0,
                            operation=operation)

    def _submit(self, plugin_id: str, payload: Any, *, instance_id: str | None,
                depth: int, operation: str = "run") -> Job | FallbackJob:
        spec = self.spec(plugin_id)
        if not isinstance(operation, str) or not spec.offers(operation):
            raise UnknownOperationError(plugin_id, str(operation), operations=spec.operations)
        if instance_id is not None:
            instance = self.instance(instance_id)
            if instance.plugin_id != plugin_id:
                raise UnknownInstanceError(instance_id)
            if instance.status == "failed":
                raise InstanceFailedError(instance_id, instance.last_error)
        self._encode(plugin_id, payload)
        in_publish = self._checks_in_publish
        if not in_publish:
            self._refuse_if_paused(plugin_id)
        try:
            # A closed breaker costs no round trip of its own (tasks/breaker_view.py).
            permit = self._breaker_view.admit(self.breakers, spec
                                              ) if self.settings.breaker_enabled else UNGUARDED
        except BreakerUnavailable as exc:
            raise BreakerUnavailableError(
                f"breaker for {plugin_id!r} unreachable (fail mode closed): {exc}") from exc
        if not permit.allowed:
            if in_publish:
                self._refuse_if_paused(plugin_id)  # a pause is said first, as it always was
            refusal = CircuitOpenError.of(plugin_id, state=permit.state,
                                          retry_after_ms=permit.retry_after_ms)
            return self._fallback(spec, payload, refusal, depth=depth, operation=operation)
        deadlines = spec.deadlines
        headers: dict[str, Any] = {REVISION_HEADER: spec.revision}
        if permit.state is BreakerState.HALF_OPEN:
            headers[TRIAL_HEADER] = permit.generation
        with self._unavailable_as_error():
            options: dict[str, Any] = {
                "queue": spec.queue,
                "soft_time_limit": deadlines.celery_soft_s,
                "time_limit": deadlines.celery_hard_s,
                "headers": headers,
            }
            if self._declare_free:
                options["declare"] = []
            kwargs: dict[str, Any] = {"payload": payload, "instance_id": instance_id}
            if operation != "run":
                kwargs["operation"] = operation
            job_id = uuid()
            if in_publish:
                # The pause check and `queued` ride on the publish (tasks/submit_step.py).
                headers[SUBMIT_HEADER] = SubmitStep.for_job(
                    self.settings.keys, plugin_id=plugin_id, job_id=job_id,
                    instance_id=instance_id, ttl_s=self.settings.result_expires_s)
            else:
                # Before the publish, so `queued` is always the first change.
                self.job_watcher.store.set(job_id, "queued", plugin_id=plugin_id,
                                           instance_id=instance_id)
            try:
                result = self.app.send_task(spec.task_name, kwargs=kwargs, task_id=job_id,
                                            **options)
            except PluginDisabledError:  # refused by the publish: nothing was pushed
                _stop_waiting(self.app, job_id)
                raise
        isolation = spec.isolation
        return Job(result, plugin_id=plugin_id, instance_id=instance_id,
                   max_restarts=isolation.max_restarts if isolation.auto_restart else 0,
                   watcher=self.job_watcher)

    @cached_property
    def _declare_free(self) -> bool:
        """Whether a submit can skip kombu's queue declare: on pluginpool's Redis transports
        a declare only answers the queue's length (4 LLEN) and records an exchange binding
        (an SADD), each in a transaction of its own, and Celery publishes plugin jobs
        through the anonymous exchange, which never reads that binding; workers declare
        the queues they consume. kombu declares a queue at the first publish to it on each
        connection: with jobs spread over 10,000 plugins that was nearly every submit's
        (1.8 ms of its 6)."""
        return self.app.conf.broker_transport in (TRANSPORT_PATH, SENTINEL_TRANSPORT_PATH)

    @cached_property
    def _checks_in_publish(self) -> bool:
        """Whether the publish itself checks the pause and writes `queued`: pluginpool's
        transport, with the broker's queues in pluginpool's Redis database."""
        return (self.app.conf.broker_transport == TRANSPORT_PATH
                and same_database(self.settings.effective_broker_url, self.settings.redis_url))

    def _refuse_if_paused(self, plugin_id: str) -> None:
        with self._unavailable_as_error():
            pause = pause_of(self.redis, self.settings.keys, plugin_id)
        if pause is not None:  # an operator disabled or is draining it (tasks/operations.py)
            raise PluginDisabledError(plugin_id, mode=pause.mode, by=pause.by)

    def _fallback(self, spec: PluginSpec, payload: Any, refusal: CircuitOpenError, *,
                  depth: int, operation: str) -> Job | FallbackJob:
        """The same operation of the fallback plugin; the refusal itself if that plugin does
        not offer it (its `run` would answer another question)."""
        fallback = spec.fallback
        if fallback is None or depth >= MAX_FALLBACK_DEPTH:
            raise refusal
        if fallback.kind == "value":
            return FallbackJob(fallback.value, plugin_id=spec.id, refusal=refusal)
        assert fallback.plugin is not None
        if not self.spec(fallback.plugin).offers(operation):
            raise refusal
        job = self._submit(fallback.plugin, payload, instance_id=None, depth=depth + 1,
                           operation=operation)
        if isinstance(job, Job):
            job.fallback_for = spec.id
            job.is_fallback = True
        return job

    # -- breaker and events ---------------------------------------------------------------

    def breaker(self, plugin_id: str) -> BreakerStatus:
        """State, window counts, failure rate, time to next trial and transition history."""
        spec = self.spec(plugin_id)
        with self._unavailable_as_error():
            return self.breakers.status(plugin_id, spec.breaker,
                                        default_open_ms=spec.default_open_ms)

    def override_breaker(self, plugin_id: str,
                         action: Literal["reset", "force_open"]) -> BreakerState:
        """Operator override, recorded in the breaker's history as such."""
        spec = self.spec(plugin_id)
        self._breaker_view.on_transition({"plugin": plugin_id})  # this producer sees it at once
        with self._unavailable_as_error():
            return self.breakers.override(plugin_id, spec.breaker,
                                          default_open_ms=spec.default_open_ms, action=action)

    def health(self, plugin_id: str | None = None) -> PluginHealth | list[PluginHealth]:
        """One plugin's health, or every registered plugin's (the aggregator's figures)."""
        with self._unavailable_as_error():
            if plugin_id is not None:
                return self.health_reader.read(self.spec(plugin_id))
            return self.health_reader.read_all(self.registry.all())

    def on_error(self, plugin_id: str, handler: Handler) -> None:
        """Call `handler(event)` for every failed run of the plugin (`"*"`: of every plugin),
        whichever producer sent it; the event has type, plugin_id, instance_id, job_id,
        message, details and at."""
        self._subscriptions.add(self.settings.keys.error_channel, plugin_id, handler)

    def on_breaker_change(self, plugin_id: str, handler: Handler) -> None:
        """Call `handler(event)` for every breaker transition (plugin, from, to, reason)."""
        self._subscriptions.add(self.settings.keys.breaker_channel, plugin_id, handler)

    def execute(self, instance_id: str, payload: Any = None, *, operation: str = "run",
                timeout: float | None = None) -> Any:
        """Run an operation on a loaded instance and wait for its value (or its fallback's)."""
        instance = self.instance(instance_id)
        return self.submit(instance.plugin_id, payload, instance_id=instance_id,
                           operation=operation).result(timeout)

    def job(self, job_id: str, *, plugin_id: str | None = None) -> Job:
        """A handle on an earlier job by its id."""
        return Job(self.app.AsyncResult(job_id), plugin_id=plugin_id or "", instance_id=None,
                   watcher=self.job_watcher)

    @property
    def job_watcher(self) -> JobWatcher:
        """Job statuses: stored changes, and one subscriber thread for every job followed."""
        if self._job_watcher is None:
            self._job_watcher = JobWatcher(self.redis, self.settings.keys,
                                           ttl_s=self.settings.result_expires_s)
        return self._job_watcher

    def close(self) -> None:
        if self._job_watcher is not None:
            self._job_watcher.close()
        self._subscriptions.close()
        self.redis.close()
        self.app.close()

    def __enter__(self) -> PluginClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------

    def _encode(self, plugin_id: str, payload: Any, *, field: str = "payload") -> None:
        """Refuse what the wire or a worker cannot take: too deep (checked first, without
        recursion, since the encoder recurses per level), not JSON, too large."""
        limit = self.settings.max_payload_depth
        if nesting_depth(payload, limit=limit) > limit:
            raise PayloadTooDeepError(plugin_id, depth_limit=limit, field=field)
        try:
            encoded = json.dumps(payload, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidPayloadError(plugin_id, str(exc), field=field) from None
        size = len(encoded.encode())
        if size > self.settings.max_payload_bytes:
            raise PayloadTooLargeError(plugin_id, size_bytes=size,
                                       limit_bytes=self.settings.max_payload_bytes)

    def _unavailable_as_error(self) -> _UnavailableAsError:
        return _UnavailableAsError(self.settings.redis_url)


def _stop_waiting(app: Celery, job_id: str) -> None:
    """Drop the result subscription Celery took for a job that was never pushed."""
    consumer = getattr(app.backend, "result_consumer", None)
    if consumer is not None and hasattr(consumer, "cancel_for"):
        with contextlib.suppress(redis.RedisError, OperationalError):  # lapses anyway
            consumer.cancel_for(job_id)


class _UnavailableAsError:
    """Turns Redis/broker connection failures into BrokerUnavailableError; never swallows."""

    def __init__(self, url: str) -> None:
        self._url = url

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc is not None and isinstance(exc, redis.ConnectionError | redis.TimeoutError
                                          | OperationalError):
            raise BrokerUnavailableError(f"Redis/broker unreachable: {exc}") from exc
