"""The sandboxed runner: one fresh process per run, forked from the pool child.

Path of one run: check `requires` here (metadata only, no plugin code) → make the
workspace → socketpair → fork → the child locks itself down (child.py) and runs the
plugin → the supervisor watches it (supervisor.py) → the outcome becomes a value or a
typed PluginExecutionError, with the run's usage either way → process group killed,
workspace removed. The pool child never runs plugin code, so nothing a plugin changes
survives its run.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import glob
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from celery.exceptions import SoftTimeLimitExceeded

from pluginpool.policy.errors import ErrorInfo, ErrorType, PluginExecutionError
from pluginpool.policy.storage import InstanceStorage
from pluginpool.pool.sandbox import landlock, seccomp_filter
from pluginpool.pool.sandbox.child import CHANNEL_FD, ChildPlan, run_child
from pluginpool.pool.sandbox.supervisor import MB, Supervision, Supervisor
from pluginpool.tasks.context import PluginContext
from pluginpool.tasks.execution import WorkerServices
from pluginpool.tasks.loader import check_requires
from pluginpool.tasks.runner import RunReport
from pluginpool.tasks.spec import PluginSpec

SYSTEM_READ_PATHS = (
    "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/share/zoneinfo", "/etc/ssl",
    "/etc/ca-certificates", "/etc/localtime", "/etc/hosts", "/etc/resolv.conf",
    "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/services", "/etc/protocols", "/etc/host.conf",
    "/dev/urandom", "/dev/random", "/dev/null",
)
FRAME_OVERHEAD_BYTES = 64 * 1024
PR_SET_CHILD_SUBREAPER = 36


def _child_pids() -> list[int]:
    """This process's children, from /proc (cheap), or from psutil (a /proc scan)."""
    try:
        pids: list[int] = []
        for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
            with open(path) as listing:
                pids.extend(int(pid) for pid in listing.read().split())
        return pids
    except OSError:
        return [proc.pid for proc in psutil.Process().children()]


def kill_leftover_children() -> None:
    """Kill and reap every process still below this pool child after a run (orphans of a
    run are re-parented here, see _become_subreaper)."""
    for pid in _child_pids():
        with contextlib.suppress(psutil.Error):
            for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


@functools.lru_cache(maxsize=256)
def interpreter_read_paths(extra: tuple[str, ...]) -> tuple[str, ...]:
    """The interpreter, its libraries, installed packages, plugin paths, plus `extra`."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *SYSTEM_READ_PATHS}
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    for module in ("pluginpool.policy", "pluginpool.tasks", "pluginpool.pool"):
        package = sys.modules.get(module)
        if package is not None and getattr(package, "__path__", None):
            paths.update(os.path.realpath(p) for p in package.__path__)
    paths.update(extra)
    return tuple(sorted(os.path.realpath(p) for p in paths))


class SandboxRunner:
    """Implements the Runner protocol of pluginpool.tasks.runner with a process per run."""

    def __init__(self, services: WorkerServices) -> None:
        self._services = services
        self._settings = services.settings
        self._landlock_abi = landlock.abi_version()
        self._seccomp = seccomp_filter.available()
        self._subreaper_of = 0

    def _become_subreaper(self) -> None:
        """Orphans of a run (a plugin allowed to start processes may detach them) are
        re-parented to this pool child, which then finds and kills them. Not inherited
        across fork, so each pool child sets it for itself."""
        if self._subreaper_of != os.getpid():
            ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            self._subreaper_of = os.getpid()

    def _seccomp_program(self, spec: PluginSpec) -> bytes | None:
        if not self._seccomp:
            return None
        return seccomp_filter.compile_filter(
            allow_processes=spec.permissions.allow_processes,
            allow_network=bool(spec.permissions.network_hosts), channel_fd=CHANNEL_FD)

    @classmethod
    def factory(cls, services: WorkerServices) -> SandboxRunner:
        return cls(services)

    def run(self, spec: PluginSpec, ctx: PluginContext, payload: Any) -> RunReport:
        registry = self._services.redis
        check_requires(spec, registered=lambda pid: bool(
            registry.hexists(self._settings.keys.specs, pid)))
        self._become_subreaper()
        workspace = tempfile.mkdtemp(prefix=f"pp-{spec.id}-", dir=self._settings.workspace_root)
        parent_end, child_end = socket.socketpair()
        try:
            supervision = self._fork_and_supervise(spec, ctx, payload, workspace,
                                                   parent_end.fileno(), child_end)
        finally:
            parent_end.close()
            kill_leftover_children()
            shutil.rmtree(workspace, ignore_errors=True)
        return self._outcome(spec, supervision)

    def _fork_and_supervise(self, spec: PluginSpec, ctx: PluginContext, payload: Any,
                            workspace: str, parent_fd: int,
                            child_end: socket.socket) -> Supervision:
        me = psutil.Process()
        memory = me.memory_info()
        plan = ChildPlan(
            spec=spec, workspace=os.path.realpath(workspace),
            read_paths=interpreter_read_paths((*self._settings.plugin_paths,
                                               *spec.permissions.read_paths)),
            channel_fd=child_end.fileno(), vms_at_fork=memory.vms,
            landlock_abi=self._landlock_abi, seccomp_program=self._seccomp_program(spec),
            max_result_bytes=self._settings.max_result_bytes)
        ctx.workspace_root = None
        ctx._workspace = Path(plan.workspace)
        scope = ctx.instance_id or f"plugin:{spec.id}"
        storage = InstanceStorage(self._services.redis, self._settings.keys, scope,
                                  quota_bytes=spec.resource_limits.max_storage_kb * 1024)
        gc.freeze()  # keep the child from touching (copying) the parent's pages in GC
        pid = os.fork()
        if pid == 0:
            run_child(plan, ctx, payload)  # never returns
        child_end.close()
        supervisor = Supervisor(pid, parent_fd, limits=spec.resource_limits, workspace=workspace,
                                baseline_rss=memory.rss, storage=storage.handle,
                                max_frame_bytes=self._settings.max_result_bytes
                                + FRAME_OVERHEAD_BYTES)
        try:
            return supervisor.run()
        except SoftTimeLimitExceeded:
            # Celery's soft limit reached the pool child first: same meaning as our clock.
            supervisor.kill()
            supervisor._reap(block=True)
            supervisor.out.killed_for = "timeout"
            supervisor.out.observed = spec.resource_limits.timeout_ms
            return supervisor.out

    # -- outcome --------------------------------------------------------------------------

    def _usage(self, spec: PluginSpec, out: Supervision) -> dict[str, Any]:
        cpu_s = (out.rusage.ru_utime + out.rusage.ru_stime) if out.rusage else 0.0
        usage = {
            "wall_ms": round(out.wall_s * 1000, 3),
            "cpu_ms": round(cpu_s * 1000, 3),
            "cpu_percent": round(100 * cpu_s / out.wall_s, 1) if out.wall_s > 0 else 0.0,
            "peak_memory_mb": round(out.peak_memory_bytes / MB, 3),
            "max_rss_mb": round(out.rusage.ru_maxrss / 1024, 3) if out.rusage else None,
            "network_requests": int((out.result or {}).get("network_requests", 0)),
            "storage_kb": round(out.storage_bytes / 1024, 1),
            "sandboxed": True,
            "layers": out.layers or {"process": "fork", "setup": "did not complete"},
        }
        if out.limit_crossed_at is not None and out.stopped_at is not None:
            usage["stop_latency_ms"] = round((out.stopped_at - out.limit_crossed_at) * 1000, 3)
            usage["stopped_at_unix"] = out.stopped_at_unix
        return usage

    def _outcome(self, spec: PluginSpec, out: Supervision) -> RunReport:
        usage = self._usage(spec, out)
        limits = spec.resource_limits

        def fail(type_: ErrorType, message: str, **details: Any) -> PluginExecutionError:
            return PluginExecutionError(ErrorInfo(type=type_, message=message, plugin_id=spec.id,
                                                  details={**details, "usage": usage}))

        if out.killed_for == "timeout":
            raise fail(ErrorType.TIMEOUT, "run exceeded its time limit and was killed",
                       limit="timeout_ms", limit_value=limits.timeout_ms, observed=out.observed)
        if out.killed_for in ("memory", "storage"):
            limit = "max_memory_mb" if out.killed_for == "memory" else "max_storage_kb"
            value = limits.max_memory_mb if out.killed_for == "memory" else limits.max_storage_kb
            raise fail(ErrorType.RESOURCE, f"run crossed its {out.killed_for} limit and was killed",
                       limit=limit, limit_value=value, observed=round(out.observed or 0, 1),
                       restartable=True)
        if out.killed_for == "result_size":
            raise fail(ErrorType.RESOURCE, "result is larger than the result limit",
                       limit="max_result_bytes", limit_value=self._settings.max_result_bytes,
                       observed=out.observed)
        result = out.result
        if result is None:
            raise self._died(spec, out, fail)
        if not result.get("ok"):
            error = dict(result.get("error") or {})
            details = {**error.get("details", {}), "usage": usage}
            if error.get("type") == str(ErrorType.RESOURCE) and details.get("limit") == \
                    "max_memory_mb":
                details["restartable"] = True
            raise PluginExecutionError(ErrorInfo(
                type=ErrorType(error.get("type", "runtime")),
                message=str(error.get("message", "plugin failed")), plugin_id=spec.id,
                details=details))
        if out.storage_bytes > limits.max_storage_kb * 1024:
            raise fail(ErrorType.RESOURCE, "workspace outgrew the storage quota",
                       limit="max_storage_kb", limit_value=limits.max_storage_kb,
                       observed=round(out.storage_bytes / 1024, 1))
        return RunReport(value=result.get("value"), usage=usage)

    @staticmethod
    def _died(spec: PluginSpec, out: Supervision,
              fail: Callable[..., PluginExecutionError]) -> PluginExecutionError:
        status = out.wait_status or 0
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
            return fail(ErrorType.RUNTIME, "the plugin closed its result channel",
                        exit_code=0)
        return fail(ErrorType.RUNTIME, f"the run's process exited with code {code}",
                    exit_code=code, restartable=True, process_died=True)
