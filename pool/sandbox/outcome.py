"""What a supervised setup or run amounts to: the run's usage, and a value or one typed
PluginExecutionError."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from pluginpool.policy.errors import ErrorInfo, ErrorType, PluginExecutionError
from pluginpool.pool.runner import RunReport, Usage
from pluginpool.pool.sandbox.runtime.limits import MB
from pluginpool.pool.sandbox.runtime.messages import Result, RunError, SetupFailed
from pluginpool.pool.sandbox.supervisor import MAX_WORKSPACE_ENTRIES, Supervision
from pluginpool.pool.sandbox.warm import WarmSandbox
from pluginpool.tasks.spec import PluginSpec

Fail = Callable[..., PluginExecutionError]


def usage_of(out: Supervision, *, baseline_rss: int, sandbox: WarmSandbox, run_pid: int,
             setup: Supervision | None) -> Usage:
    """The run alone: wall and CPU from the moment plugin code started (the Started frame,
    which carries the CPU the run's own lock-down took) to its result; memory above the
    zygote from the kernel's high-water mark (wait4) or the sampler."""
    exit_ = out.exit
    result = out.result if isinstance(out.result, Result) else None
    wall_s = out.wall_s
    if out.started_at is not None:
        wall_s = (out.finished_at or out.started_at + out.wall_s) - out.started_at
    cpu_s = exit_.cpu_s if exit_ is not None and exit_.cpu_s is not None else 0.0
    if out.started is not None:
        cpu_s = max(cpu_s - out.started.cpu_s, 0.0)
    if result is not None and result.wall_s > 0:
        # Measured in the run, around the plugin's call alone (the kernel's figure since
        # the lock-down, which also has the result and the exit, bounds what it may claim).
        cpu_s = min(result.cpu_s, cpu_s or result.cpu_s)
        wall_s = min(result.wall_s, wall_s + 0.005)
    maxrss_kb = exit_.maxrss_kb if exit_ is not None else None
    peak = out.peak_memory_bytes
    if maxrss_kb is not None:
        peak = max(peak, maxrss_kb * 1024 - baseline_rss)
    warm: dict[str, Any] = {"zygote_pid": sandbox.pid, "run_pid": run_pid,
                            "runs_served": sandbox.runs + 1}
    if setup is not None:
        warm["setup_ms"] = round(sandbox.setup_ms, 3)
    usage = Usage(
        wall_ms=round(wall_s * 1000, 3), cpu_ms=round(cpu_s * 1000, 3),
        cpu_percent=round(100 * cpu_s / wall_s, 1) if wall_s > 0 else 0.0,
        peak_memory_mb=round(max(peak, 0) / MB, 3),
        max_rss_mb=round(maxrss_kb / 1024, 3) if maxrss_kb is not None else None,
        network_requests=result.network_requests if result is not None else 0,
        storage_kb=round(out.storage_bytes / 1024, 1), sandboxed=True,
        layers={**(out.started.layers if out.started is not None else
                   {"process": "fork", "setup": "did not complete"}),
                "zygote_layers": sandbox.layers},
        warm=warm)
    if out.limit_crossed_at is not None and out.stopped_at is not None:
        usage.stop_latency_ms = round((out.stopped_at - out.limit_crossed_at) * 1000, 3)
        usage.stopped_at_unix = out.stopped_at_unix
    return usage


def _failer(spec: PluginSpec, usage: dict[str, Any] | None, **extra: Any) -> Fail:
    def fail(type_: ErrorType, message: str, **details: Any) -> PluginExecutionError:
        merged = {**extra, **details}
        if usage is not None:
            merged["usage"] = usage
        return PluginExecutionError(ErrorInfo(type=type_, message=message, plugin_id=spec.id,
                                              details=merged))
    return fail


RESERVED_DETAILS = frozenset(("type_", "message", "usage"))
"""Keys of a sandbox's error details the pool child sets itself (the run's usage) or that
name fail()'s own arguments: a run's details cannot replace or collide with them."""


def _run_details(error: RunError, *, drop: frozenset[str] = RESERVED_DETAILS) -> dict[str, Any]:
    return {key: value for key, value in error.details.items() if key not in drop}


def _from_run_error(error: RunError, fail: Fail) -> PluginExecutionError:
    return fail(ErrorType(error.type), error.message, **_run_details(error))


def _stopped_for_its_conduct(out: Supervision, fail: Fail,
                             what: str) -> PluginExecutionError | None:
    """A setup or run the supervisor stopped for what it did to the sandbox itself: broke
    its protocol, or filled its workspace with entries."""
    if out.killed_for == "protocol":
        return fail(ErrorType.RUNTIME, f"the {what} broke the sandbox protocol and was killed",
                    protocol_error=True, reason=out.protocol_error)
    if out.killed_for == "files":
        return fail(ErrorType.RESOURCE, f"the {what} made more files than a workspace may "
                    "hold and was killed", limit="max_workspace_entries",
                    limit_value=MAX_WORKSPACE_ENTRIES, observed=out.observed)
    return None


def run_report(spec: PluginSpec, out: Supervision, usage: Usage, *,
               max_result_bytes: int) -> RunReport:
    """The value of a run, or raise its typed error."""
    usage_dict = usage.as_dict()
    limits = spec.resource_limits
    fail = _failer(spec, usage_dict)
    if out.killed_for == "timeout":
        raise fail(ErrorType.TIMEOUT, "run exceeded its time limit and was killed",
                   limit="timeout_ms", limit_value=limits.timeout_ms, observed=out.observed)
    if out.killed_for in ("memory", "storage"):
        limit = "max_memory_mb" if out.killed_for == "memory" else "max_storage_kb"
        value = limits.max_memory_mb if out.killed_for == "memory" else limits.max_storage_kb
        raise fail(ErrorType.RESOURCE, f"run crossed its {out.killed_for} limit and was killed",
                   limit=limit, limit_value=value, observed=round(out.observed or 0, 1),
                   restartable=True)
    stopped = _stopped_for_its_conduct(out, fail, "run")
    if stopped is not None:
        raise stopped
    if out.killed_for == "result_size":
        raise fail(ErrorType.RESOURCE, "result is larger than the result limit",
                   limit="max_result_bytes", limit_value=max_result_bytes,
                   observed=out.observed)
    result = out.result
    if not isinstance(result, Result):
        raise died(spec, out, fail)
    if not result.ok:
        raise _from_run_error(result.error or RunError("runtime", "plugin failed"), fail)
    if out.storage_bytes > limits.max_storage_kb * 1024:
        raise fail(ErrorType.RESOURCE, "workspace outgrew the storage quota",
                   limit="max_storage_kb", limit_value=limits.max_storage_kb,
                   observed=round(out.storage_bytes / 1024, 1))
    return RunReport(value=result.value, usage=usage_dict)


def died(spec: PluginSpec, out: Supervision, fail: Fail) -> PluginExecutionError:
    exit_ = out.exit
    if exit_ is None or exit_.sandbox_died or exit_.status is None:
        return fail(ErrorType.RUNTIME, "the warm sandbox died during the run",
                    restartable=True, process_died=True, sandbox_died=True)
    status = exit_.status
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ \
            else str(signum)
        if signum == signal.SIGXCPU:
            return fail(ErrorType.TIMEOUT, "run used up its CPU-time backstop",
                        limit="timeout_ms", limit_value=spec.resource_limits.timeout_ms)
        return fail(ErrorType.RUNTIME, f"the run's process was killed by {name}",
                    signal=name, restartable=True, process_died=True)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    if code == 0:
        return fail(ErrorType.RUNTIME, "the plugin closed its result channel", exit_code=0)
    return fail(ErrorType.RUNTIME, f"the run's process exited with code {code}",
                exit_code=code, restartable=True, process_died=True)


def setup_error(spec: PluginSpec, out: Supervision) -> PluginExecutionError:
    """Why a warm sandbox could not be set up, typed like a run's failure."""
    limits = spec.resource_limits
    fail = _failer(spec, {"wall_ms": round(out.wall_s * 1000, 3),
                          "peak_memory_mb": round(out.peak_memory_bytes / MB, 3),
                          "sandboxed": True, "layers": {"setup": "failed"}}, phase="setup")
    if out.killed_for == "timeout":
        return fail(ErrorType.TIMEOUT, "setup exceeded its time limit and was killed",
                    limit="setup_timeout_ms", limit_value=limits.setup_timeout_ms,
                    observed=out.observed)
    if out.killed_for in ("memory", "storage"):
        limit = "max_memory_mb" if out.killed_for == "memory" else "max_storage_kb"
        value = limits.max_memory_mb if out.killed_for == "memory" else limits.max_storage_kb
        return fail(ErrorType.RESOURCE, f"setup crossed its {out.killed_for} limit and was "
                    "killed", limit=limit, limit_value=value,
                    observed=round(out.observed or 0, 1))
    stopped = _stopped_for_its_conduct(out, fail, "setup")
    if stopped is not None:
        return stopped
    if isinstance(out.result, SetupFailed):
        error = out.result.error
        return fail(ErrorType(error.type), error.message,
                    **_run_details(error, drop=RESERVED_DETAILS | {"restartable", "phase"}))
    return fail(ErrorType.RUNTIME, "the warm sandbox died during its setup",
                sandbox_died=True)
