"""Turning what Celery stored for a job into a value or a typed PluginExecutionError.

Celery records some failures itself, with its own exceptions (a hard time limit, a pool
child lost for good); they are classified here so the caller always sees one error type.
"""

from __future__ import annotations

from typing import Any

from celery.exceptions import SoftTimeLimitExceeded, TaskRevokedError, TimeLimitExceeded

from pluginpool.policy.errors import ErrorInfo, ErrorType, PluginExecutionError


def error_for_failure(exc: BaseException | Any, *, plugin_id: str | None, job_id: str,
                      instance_id: str | None = None) -> PluginExecutionError:
    """Classify the exception Celery stored for a failed job."""
    ids = {"plugin_id": plugin_id, "job_id": job_id, "instance_id": instance_id}
    if isinstance(exc, PluginExecutionError):
        info = exc.info.model_copy(update={k: v for k, v in ids.items() if v is not None})
        return PluginExecutionError(info)
    name = type(exc).__name__
    if isinstance(exc, TimeLimitExceeded | SoftTimeLimitExceeded) or name in (
        "TimeLimitExceeded", "SoftTimeLimitExceeded"
    ):
        return PluginExecutionError(ErrorInfo(
            type=ErrorType.TIMEOUT, message="run exceeded its hard time limit and was killed",
            details={"celery_exception": name, "limit_s": _first_arg(exc)}, **ids))
    if name == "WorkerLostError":
        return PluginExecutionError(ErrorInfo(
            type=ErrorType.RUNTIME,
            message="the process running the plugin died and restarts are exhausted",
            details={"celery_exception": name, "reason": str(exc), "restarts_exhausted": True},
            **ids))
    if isinstance(exc, TaskRevokedError):
        return PluginExecutionError(ErrorInfo(
            type=ErrorType.RUNTIME, message="job was revoked",
            details={"celery_exception": name}, **ids))
    return PluginExecutionError(ErrorInfo(
        type=ErrorType.RUNTIME, message=f"{name}: {exc}",
        details={"exception_type": name}, **ids))


def _first_arg(exc: Any) -> Any:
    args = getattr(exc, "args", ())
    return args[0] if args else None


def unwrap_value(result: Any) -> tuple[Any, dict[str, Any]]:
    """Split a task's envelope into (value, meta); a foreign task's result is the value."""
    if isinstance(result, dict) and set(result) == {"value", "meta"}:
        return result["value"], result["meta"]
    return result, {}
