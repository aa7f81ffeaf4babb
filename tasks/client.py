"""The producer's API: register plugins, load instances, submit jobs and wait for them."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from pluginpool.policy.errors import (
    BrokerUnavailableError,
    InvalidPayloadError,
    JobWaitTimeoutError,
    PayloadTooLargeError,
    UnknownInstanceError,
)
from pluginpool.tasks.app import create_app
from pluginpool.tasks.instances import Instance, InstanceStore
from pluginpool.tasks.manifest import load_manifest
from pluginpool.tasks.outcome import error_for_failure, unwrap_value
from pluginpool.tasks.redis_conn import redis_client
from pluginpool.tasks.registry import Registry, SpecCache
from pluginpool.tasks.routing import REVISION_HEADER
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec


class Job:
    """A submitted job: its id now, its outcome later."""

    def __init__(self, async_result: AsyncResult[Any], *, plugin_id: str,
                 instance_id: str | None, max_restarts: int | None = None) -> None:
        self.async_result = async_result
        self.max_restarts = max_restarts
        self.id: str = async_result.id
        self.plugin_id = plugin_id
        self.instance_id = instance_id
        self.meta: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<Job {self.id} plugin={self.plugin_id}>"

    @property
    def state(self) -> str:
        return str(self.async_result.state)

    def ready(self) -> bool:
        return bool(self.async_result.ready())

    def result(self, timeout: float | None = None) -> Any:
        """The plugin's value; raises PluginExecutionError, or JobWaitTimeoutError."""
        try:
            raw = self.async_result.get(timeout=timeout, propagate=False,
                                        disable_sync_subtasks=False)
        except CeleryTimeoutError:
            raise JobWaitTimeoutError(self.id, timeout_s=timeout or 0.0) from None
        if self.async_result.failed():
            error = error_for_failure(raw, plugin_id=self.plugin_id, job_id=self.id,
                                      instance_id=self.instance_id)
            if error.details.get("restarts_exhausted") and self.max_restarts is not None:
                error.info.details["max_restarts"] = self.max_restarts
            raise error
        value, self.meta = unwrap_value(raw)
        return value

    def forget(self) -> None:
        """Drop the stored result once read (results otherwise expire after result_expires_s)."""
        self.async_result.forget()


class PluginClient:
    """One producer's handle on pluginpool. Thread-safe for submit; cheap to keep around."""

    def __init__(self, settings: Settings, *, app: Celery | None = None,
                 client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.app = app or create_app(settings)
        self.redis = client or redis_client(settings)
        self.registry = Registry(self.redis, settings.keys,
                                 visibility_timeout_s=settings.visibility_timeout_s)
        self._specs = SpecCache(self.registry, ttl_s=settings.spec_cache_ttl_s)
        self.instances = InstanceStore(self.redis, settings.keys)

    @classmethod
    def from_env(cls, **overrides: Any) -> PluginClient:
        return cls(Settings.from_env(**overrides))

    # -- registry -----------------------------------------------------------------------

    def register(self, source: str | Path | PluginSpec | Iterable[PluginSpec]) -> list[PluginSpec]:
        """Publish specs from a TOML manifest path, one spec, or several; all or nothing."""
        if isinstance(source, str | Path):
            specs, origin = load_manifest(source), str(source)
        elif isinstance(source, PluginSpec):
            specs, origin = [source], "<python>"
        else:
            specs, origin = list(source), "<python>"
        specs = [spec.with_defaults(limits=self.settings.default_limits,
                                    isolation=self.settings.default_isolation)
                 for spec in specs]
        with self._unavailable_as_error():
            published = self.registry.publish(specs, source=origin)
        self._specs.invalidate()
        return published

    def plugins(self) -> list[PluginSpec]:
        with self._unavailable_as_error():
            return self.registry.all()

    def spec(self, plugin_id: str) -> PluginSpec:
        with self._unavailable_as_error():
            return self._specs.get(plugin_id)

    # -- instances ----------------------------------------------------------------------

    def load(self, plugin_id: str, initial_data: dict[str, Any] | None = None) -> str:
        """Create a plugin instance; its `initial_data` reaches every run as ctx.initial_data."""
        self.spec(plugin_id)
        data = initial_data or {}
        self._encode(plugin_id, data)
        with self._unavailable_as_error():
            return self.instances.create(plugin_id, data).id

    def instance(self, instance_id: str) -> Instance:
        with self._unavailable_as_error():
            return self.instances.get(instance_id)

    def unload(self, instance_id: str) -> None:
        with self._unavailable_as_error():
            self.instances.delete(instance_id)

    # -- jobs ---------------------------------------------------------------------------

    def submit(self, plugin_id: str, payload: Any = None, *,
               instance_id: str | None = None) -> Job:
        """Enqueue one job and return at once. Bad input raises; nothing is enqueued then."""
        spec = self.spec(plugin_id)
        if instance_id is not None:
            instance = self.instance(instance_id)
            if instance.plugin_id != plugin_id:
                raise UnknownInstanceError(instance_id)
        self._encode(plugin_id, payload)
        limits = spec.resource_limits
        with self._unavailable_as_error():
            options: dict[str, Any] = {
                "queue": spec.queue,
                "soft_time_limit": limits.soft_time_limit_s,
                "time_limit": limits.hard_time_limit_s,
                "headers": {REVISION_HEADER: spec.revision},
            }
            result = self.app.send_task(
                spec.task_name, kwargs={"payload": payload, "instance_id": instance_id},
                **options)
        isolation = spec.isolation
        return Job(result, plugin_id=plugin_id, instance_id=instance_id,
                   max_restarts=isolation.max_restarts if isolation.auto_restart else 0)

    def execute(self, instance_id: str, payload: Any = None, *,
                timeout: float | None = None) -> Any:
        """Run a job on a loaded instance and wait for its value."""
        instance = self.instance(instance_id)
        return self.submit(instance.plugin_id, payload, instance_id=instance_id).result(timeout)

    def job(self, job_id: str, *, plugin_id: str | None = None) -> Job:
        """A handle on an earlier job by its id."""
        return Job(self.app.AsyncResult(job_id), plugin_id=plugin_id or "", instance_id=None)

    def close(self) -> None:
        self.redis.close()
        self.app.close()

    def __enter__(self) -> PluginClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------

    def _encode(self, plugin_id: str, payload: Any) -> None:
        try:
            encoded = json.dumps(payload, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidPayloadError(plugin_id, str(exc)) from None
        size = len(encoded.encode())
        if size > self.settings.max_payload_bytes:
            raise PayloadTooLargeError(plugin_id, size_bytes=size,
                                       limit_bytes=self.settings.max_payload_bytes)

    def _unavailable_as_error(self) -> _UnavailableAsError:
        return _UnavailableAsError(self.settings.redis_url)


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
