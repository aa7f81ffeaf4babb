"""Running a loaded plugin function and turning whatever happens into a typed outcome.

This is the in-process runner: the plugin runs in the Celery pool child itself, under
Celery's soft and hard time limits. Sandboxed runners (pluginpool.pool) implement the
same `Runner` protocol.
"""

from __future__ import annotations

import json
import resource
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Protocol

from celery.exceptions import SoftTimeLimitExceeded

from pluginpool.policy.errors import ErrorType, PluginExecutionError
from pluginpool.tasks.context import PluginContext
from pluginpool.tasks.loader import PluginLoader
from pluginpool.tasks.spec import PluginSpec

TRACEBACK_LIMIT_CHARS = 8_000
BILLIARD_SIGTERM_EXIT = -(256 - signal.SIGTERM)
"""The SystemExit code billiard raises in a pool child it is killing (hard time limit)."""


@dataclass(frozen=True)
class RunReport:
    """A successful run's value and its resource usage."""

    value: Any
    usage: dict[str, Any] = field(default_factory=dict)


class Runner(Protocol):
    """Runs one job of a plugin; returns a RunReport or raises PluginExecutionError (with
    the run's usage in `details["usage"]` when it is known)."""

    def run(self, spec: PluginSpec, ctx: PluginContext, payload: Any) -> RunReport: ...


def check_result(spec: PluginSpec, value: Any, *, max_result_bytes: int) -> None:
    """A result must be JSON and no larger than the result limit."""
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PluginExecutionError.of(
            ErrorType.RUNTIME, f"result is not JSON-serialisable: {exc}",
            plugin_id=spec.id, result_type=type(value).__name__,
        ) from None
    size = len(encoded.encode())
    if size > max_result_bytes:
        raise PluginExecutionError.of(
            ErrorType.RESOURCE, "result is larger than the result limit",
            plugin_id=spec.id, limit="max_result_bytes", limit_value=max_result_bytes,
            observed=size,
        )


def error_from_exception(spec: PluginSpec, exc: BaseException) -> PluginExecutionError:
    """Classify an exception raised by plugin code."""
    if isinstance(exc, SoftTimeLimitExceeded):
        return PluginExecutionError.of(
            ErrorType.TIMEOUT, "run exceeded its time limit",
            plugin_id=spec.id, limit="timeout_ms", limit_value=spec.resource_limits.timeout_ms,
        )
    if isinstance(exc, MemoryError):
        return PluginExecutionError.of(
            ErrorType.RESOURCE, "run ran out of memory",
            plugin_id=spec.id, limit="max_memory_mb",
            limit_value=spec.resource_limits.max_memory_mb,
        )
    text = "".join(traceback.format_exception(exc))[-TRACEBACK_LIMIT_CHARS:]
    return PluginExecutionError.of(
        ErrorType.RUNTIME, f"{type(exc).__name__}: {exc}",
        plugin_id=spec.id, exception_type=type(exc).__name__, traceback=text,
    )


class InProcessRunner:
    """Runs the plugin in the calling process: trusted plugins, fastest path."""

    def __init__(self, loader: PluginLoader, *, max_result_bytes: int) -> None:
        self._loader = loader
        self._max_result_bytes = max_result_bytes

    def run(self, spec: PluginSpec, ctx: PluginContext, payload: Any) -> RunReport:
        function = self._loader.load(spec)
        started = time.perf_counter()
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        usage: dict[str, Any] = {}
        try:
            value = function(ctx, payload)
            check_result(spec, value, max_result_bytes=self._max_result_bytes)
        except SystemExit as exc:
            if exc.code == BILLIARD_SIGTERM_EXIT:
                raise  # the pool is killing this child; Celery records the timeout
            raise self._with_usage(error_from_exception(spec, exc), usage) from None
        except PluginExecutionError as exc:
            raise self._with_usage(exc, usage) from None
        except (Exception, GeneratorExit) as exc:
            raise self._with_usage(error_from_exception(spec, exc), usage) from None
        finally:
            ctx.remove_workspace()
            wall_s = time.perf_counter() - started
            cpu_after = resource.getrusage(resource.RUSAGE_SELF)
            cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime
                     + cpu_after.ru_stime - cpu_before.ru_stime)
            usage.update({"wall_ms": round(wall_s * 1000, 3), "cpu_ms": round(cpu_s * 1000, 3),
                          "cpu_percent": round(100 * cpu_s / wall_s, 1) if wall_s else 0.0,
                          "max_rss_mb": round(cpu_after.ru_maxrss / 1024, 3),
                          "sandboxed": False, "layers": {"process": "pool child"}})
        return RunReport(value=value, usage=usage)

    @staticmethod
    def _with_usage(error: PluginExecutionError, usage: dict[str, Any]) -> PluginExecutionError:
        error.info.details["usage"] = usage  # filled in by the finally clause above
        return error
