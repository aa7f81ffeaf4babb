"""Handles on submitted jobs: a real one (its outcome later) or a fallback (resolved now)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from celery import states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from pluginpool.policy.errors import (
    CircuitOpenError,
    JobCancelledError,
    JobWaitTimeoutError,
    PluginPoolError,
)
from pluginpool.tasks.outcome import error_for_failure, unwrap_value

if TYPE_CHECKING:
    from pluginpool.tasks.job_watch import (
        ErrorCallback,
        JobWatcher,
        ResultCallback,
        StatusCallback,
    )


class Job:
    """A submitted job: its id now, its outcome later."""

    is_fallback = False

    def __init__(self, async_result: AsyncResult[Any], *, plugin_id: str,
                 instance_id: str | None, max_restarts: int | None = None,
                 fallback_for: str | None = None, watcher: JobWatcher | None = None) -> None:
        self.async_result = async_result
        self.watcher = watcher
        """Delivers the job's status changes (on_status_change, on_result, on_error)."""
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
        return self.resolve(raw, failed=self.async_result.failed())

    def resolve(self, raw: Any, *, failed: bool) -> Any:
        """The value of a stored outcome (what the worker returned, or the exception Celery
        stored when `failed`), or its error raised; shared by every way of waiting."""
        if failed:
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

    def stored_outcome(self) -> Any:
        """`resolve` on what the result backend holds now (one read, no wait): for a job
        whose status is already final."""
        meta = self.async_result.backend.get_task_meta(self.id)
        status = meta.get("status")
        if status not in states.READY_STATES:
            raise PluginPoolError(f"job {self.id} has no stored outcome ({status})")
        return self.resolve(meta.get("result"), failed=status in states.PROPAGATE_STATES)

    def status(self) -> str | None:
        """The latest pushed status (queued, started, retrying, succeeded, failed,
        cancelled), or None for a job unknown here."""
        return self._watcher().status(self.id)

    def on_status_change(self, callback: StatusCallback) -> None:
        """Call `callback(change)` once per status change, in order, from the first; the
        change has status, seq, at, job_id, plugin_id and, per status, worker, attempt,
        reason, error_type. Runs on the client's one subscriber thread."""
        self._watcher().follow(self.id, callback)

    def on_result(self, callback: ResultCallback) -> None:
        """Call `callback(value)` once, when the job succeeded."""
        self._watcher().follow_outcome(self, on_result=callback)

    def on_error(self, callback: ErrorCallback) -> None:
        """Call `callback(error)` once, when the job failed (the error `result()` raises)."""
        self._watcher().follow_outcome(self, on_error=callback)

    def _watcher(self) -> JobWatcher:
        if self.watcher is None:
            raise PluginPoolError("this job handle was made without a client's watcher")
        return self.watcher

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

    def status(self) -> str:
        return "succeeded"

    def on_status_change(self, callback: StatusCallback) -> None:
        """Called at once: a fallback value has one status, `succeeded`."""
        callback({"job_id": self.id, "status": "succeeded", "seq": 1,
                  "plugin_id": self.plugin_id, "fallback": True})

    def on_result(self, callback: ResultCallback) -> None:
        callback(self._value)

    def on_error(self, callback: ErrorCallback) -> None:
        return None

    def forget(self) -> None:
        return None
