"""Handles on submitted jobs: a real one (its outcome later) or a fallback (resolved now)."""

from __future__ import annotations

import uuid
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from pluginpool.policy.errors import CircuitOpenError, JobCancelledError, JobWaitTimeoutError
from pluginpool.tasks.outcome import error_for_failure, unwrap_value


class Job:
    """A submitted job: its id now, its outcome later."""

    is_fallback = False

    def __init__(self, async_result: AsyncResult[Any], *, plugin_id: str,
                 instance_id: str | None, max_restarts: int | None = None,
                 fallback_for: str | None = None) -> None:
        self.async_result = async_result
        self.max_restarts = max_restarts
        self.id: str = async_result.id
        self.plugin_id = plugin_id
        self.instance_id = instance_id
        self.fallback_for = fallback_for
        """When this job runs a fallback plugin: the plugin whose breaker refused."""
        self.meta: dict[str, Any] = {}
        if fallback_for is not None:
            self.is_fallback = True

    def __repr__(self) -> str:
        return f"<Job {self.id} plugin={self.plugin_id}>"

    @property
    def state(self) -> str:
        return str(self.async_result.state)

    def ready(self) -> bool:
        return bool(self.async_result.ready())

    def result(self, timeout: float | None = None) -> Any:
        """The plugin's value; raises PluginExecutionError, CircuitOpenError (the job was
        refused at the worker because the breaker opened), JobCancelledError (an operator
        cancelled or purged it), or JobWaitTimeoutError."""
        try:
            raw = self.async_result.get(timeout=timeout, propagate=False,
                                        disable_sync_subtasks=False)
        except CeleryTimeoutError:
            raise JobWaitTimeoutError(self.id, timeout_s=timeout or 0.0) from None
        if self.async_result.failed():
            if isinstance(raw, CircuitOpenError):
                raise CircuitOpenError({**raw.info, "job_id": self.id})
            if isinstance(raw, JobCancelledError):  # an operator's cancel or purge
                raise JobCancelledError(raw.info)
            error = error_for_failure(raw, plugin_id=self.plugin_id, job_id=self.id,
                                      instance_id=self.instance_id)
            if error.details.get("restarts_exhausted") and self.max_restarts is not None:
                error.info.details["max_restarts"] = self.max_restarts
            raise error
        value, self.meta = unwrap_value(raw)
        if self.fallback_for is not None:
            self.meta = {**self.meta, "fallback": True, "fallback_for": self.fallback_for}
        return value

    def forget(self) -> None:
        """Drop the stored result once read (results otherwise expire after result_expires_s)."""
        self.async_result.forget()


class FallbackJob:
    """The plugin's breaker refused dispatch and its fallback is a fixed value."""

    is_fallback = True
    state = "FALLBACK"

    def __init__(self, value: Any, *, plugin_id: str, refusal: CircuitOpenError) -> None:
        self.id = f"fallback-{uuid.uuid4().hex}"
        self.plugin_id = plugin_id
        self.fallback_for = plugin_id
        self.instance_id: str | None = None
        self.refusal = refusal
        self._value = value
        self.meta: dict[str, Any] = {"fallback": True, "fallback_for": plugin_id,
                                     "breaker_state": refusal.state,
                                     "retry_after_ms": refusal.retry_after_ms}

    def __repr__(self) -> str:
        return f"<FallbackJob plugin={self.plugin_id}>"

    def ready(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        return self._value

    def forget(self) -> None:
        return None
