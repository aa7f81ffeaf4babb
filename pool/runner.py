"""Running a plugin's operation and turning whatever happens into a typed outcome.

This is the in-process runner: the plugin runs in the Celery pool child itself, under
Celery's soft and hard time limits. Sandboxed runners (pluginpool.pool) implement the
same `Runner` protocol and report the same `Usage`.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

from celery.exceptions import SoftTimeLimitExceeded

from pluginpool.policy.errors import ErrorType, PluginExecutionError
from pluginpool.pool.in_process_instances import InProcessInstances, Loaded, operation_of
from pluginpool.pool.loader import PluginLoader
from pluginpool.pool.sandbox.runtime.classify import describe, traceback_text, type_name
from pluginpool.pool.shutdown_exit import is_pool_shutdown
from pluginpool.tasks.context import PluginContext
from pluginpool.tasks.run_logs import captured
from pluginpool.tasks.spec import PluginSpec


@dataclass
class Usage:
    """What one run used: the same fields from every runner (the run alone: a sandbox's
    fork and lock-down, or a warm sandbox's setup, are not the plugin's CPU)."""

    wall_ms: float
    cpu_ms: float
    cpu_percent: float
    peak_memory_mb: float
    """Resident memory the run added: above the zygote it was forked from (kernel high-water
    mark at exit, or the 50 ms sampler, whichever is higher); in process, how much the run
    raised the pool child's high-water mark."""
    max_rss_mb: float | None
    network_requests: int
    storage_kb: float
    sandboxed: bool
    layers: dict[str, Any]
    warm: dict[str, Any] | None = None
    """The warm sandbox that ran it: zygote pid, run pid, runs served, setup_ms if this job
    set it up."""
    stop_latency_ms: float | None = None
    stopped_at_unix: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Each set field (`max_rss_mb` even when None): what dataclasses.asdict gave,
        without its recursive deepcopy (a tenth of a millisecond a job in the pool child).
        The `layers` and `warm` dicts and the dicts directly in them are copied; anything
        deeper (lists) is shared, so the caller must not change it in place."""
        out: dict[str, Any] = {}
        for name in _USAGE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, dict):
                out[name] = {k: dict(v) if isinstance(v, dict) else v
                             for k, v in value.items()}
            elif value is not None or name == "max_rss_mb":
                out[name] = value
        return out


_USAGE_FIELDS = tuple(f.name for f in fields(Usage))


@dataclass(frozen=True)
class RunReport:
    """A successful run's value and its resource usage."""

    value: Any
    usage: dict[str, Any] = field(default_factory=dict)
    logs: str = ""
    """The run's stdout, stderr and ctx.logger output, its last max_log_bytes."""


class Runner(Protocol):
    """Runs one job of a plugin (the operation is `ctx.operation`); returns a RunReport or
    raises PluginExecutionError (with the run's usage in `details["usage"]` when known)."""

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
    """Classify an exception raised by plugin code. Never raises: the exception is read past
    its overrides (`type()`, not `__class__`), and whatever still raises gives a fixed
    error (the plugin's own objects must not end the pool process)."""
    try:
        return _classified(spec, exc)
    except BaseException:  # plugin code: anything
        return PluginExecutionError.of(
            ErrorType.RUNTIME, "the plugin raised an exception that could not be described",
            plugin_id=spec.id, exception_type="<undescribable>")


def _classified(spec: PluginSpec, exc: BaseException) -> PluginExecutionError:
    kind = type(exc)
    if issubclass(kind, SoftTimeLimitExceeded):
        return PluginExecutionError.of(
            ErrorType.TIMEOUT, "run exceeded its time limit",
            plugin_id=spec.id, limit="timeout_ms", limit_value=spec.resource_limits.timeout_ms,
        )
    if issubclass(kind, MemoryError):
        return PluginExecutionError.of(
            ErrorType.RESOURCE, "run ran out of memory",
            plugin_id=spec.id, limit="max_memory_mb",
            limit_value=spec.resource_limits.max_memory_mb,
        )
    return PluginExecutionError.of(
        ErrorType.RUNTIME, describe(exc),
        plugin_id=spec.id, exception_type=type_name(exc), traceback=traceback_text(exc),
    )


class InProcessRunner:
    """Runs the plugin in the calling process: trusted plugins, fastest path. A class
    plugin is set up once per (plugin, revision, instance) in each pool process, its runs
    share its state (no fork here), and it is torn down as a warm sandbox is
    (in_process_instances.py)."""

    def __init__(self, loader: PluginLoader, *, max_result_bytes: int,
                 max_log_bytes: int = 65_536, instances: InProcessInstances | None = None
                 ) -> None:
        self._loader = loader
        self._max_result_bytes = max_result_bytes
        self._max_log_bytes = max_log_bytes
        self._instances = instances or InProcessInstances(idle_s=float("inf"))

    def _operation(self, spec: PluginSpec, ctx: PluginContext) -> Any:
        key = (spec.id, spec.revision, ctx.instance_id)
        loaded = self._instances.get(key)
        if loaded is None:
            # The setup sees no job, as in a warm sandbox: it serves every later one.
            setup_ctx = replace(ctx, job_id=None, operation=None)  # type: ignore[arg-type]
            try:
                loaded = Loaded(spec, self._loader.load(spec), setup_ctx)
            except PluginExecutionError as exc:
                exc.info.details.setdefault("phase", "setup")
                raise
            except (Exception, GeneratorExit, KeyboardInterrupt, SystemExit) as exc:
                if is_pool_shutdown(exc):
                    raise  # the pool is ending this child
                error = error_from_exception(spec, exc)
                error.info.details["phase"] = "setup"
                raise error from None
            finally:
                setup_ctx.remove_workspace()
            self._instances.add(key, loaded)
        return operation_of(loaded, spec, ctx.operation)

    def run(self, spec: PluginSpec, ctx: PluginContext, payload: Any) -> RunReport:
        """`_run` with its stdout, stderr and ctx.logger kept (tasks/run_logs.py)."""
        try:
            with self._instances.job(), captured(spec.id, max_bytes=self._max_log_bytes) as logs:
                try:
                    report = self._run(spec, ctx, payload)
                except PluginExecutionError as exc:
                    exc.info.details["logs"] = logs.text()
                    raise
        finally:  # what this job pushed out of the LRU, outside its logs and its errors
            self._instances.after_job()
        return replace(report, logs=logs.text())

    def _run(self, spec: PluginSpec, ctx: PluginContext, payload: Any) -> RunReport:
        started = time.perf_counter()
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        usage: dict[str, Any] = {}
        try:
            value = self._operation(spec, ctx)(ctx, payload)
            check_result(spec, value, max_result_bytes=self._max_result_bytes)
        except SystemExit as exc:
            if is_pool_shutdown(exc):
                raise  # the pool is ending this child; Celery records the timeout
            raise self._with_usage(error_from_exception(spec, exc), usage) from None
        except PluginExecutionError as exc:
            raise self._with_usage(exc, usage) from None
        except (Exception, GeneratorExit, KeyboardInterrupt) as exc:  # the plugin's own: a
            # pool process ignores SIGINT, so a KeyboardInterrupt is raised by plugin code
            raise self._with_usage(error_from_exception(spec, exc), usage) from None
        finally:
            storage_kb = _directory_kb(ctx)
            ctx.remove_workspace()
            wall_s = time.perf_counter() - started
            cpu_after = resource.getrusage(resource.RUSAGE_SELF)
            cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime
                     + cpu_after.ru_stime - cpu_before.ru_stime)
            usage.update(Usage(
                wall_ms=round(wall_s * 1000, 3), cpu_ms=round(cpu_s * 1000, 3),
                cpu_percent=round(100 * cpu_s / wall_s, 1) if wall_s else 0.0,
                peak_memory_mb=round(max(cpu_after.ru_maxrss - cpu_before.ru_maxrss, 0)
                                     / 1024, 3),
                max_rss_mb=round(cpu_after.ru_maxrss / 1024, 3), network_requests=0,
                storage_kb=storage_kb, sandboxed=False,
                layers={"process": "pool child"}).as_dict())
        return RunReport(value=value, usage=usage)

    @staticmethod
    def _with_usage(error: PluginExecutionError, usage: dict[str, Any]) -> PluginExecutionError:
        error.info.details["usage"] = usage  # filled in by the finally clause above
        return error


def _directory_kb(ctx: PluginContext) -> float:
    """The run's workspace size, if it made one."""
    if ctx._workspace is None:
        return 0.0
    total = sum(path.stat().st_size for path in ctx._workspace.rglob("*") if path.is_file())
    return round(total / 1024, 1)
