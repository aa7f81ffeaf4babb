"""The run's own process: forked from the pool child, locked down, then the plugin.

Nothing here returns: the process ends with os._exit, whatever the plugin does, so no
Celery or worker code ever runs again in it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import os
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from pluginpool.policy.errors import ErrorType, PluginExecutionError
from pluginpool.policy.storage import StorageQuotaExceeded
from pluginpool.pool.sandbox import audit, channel, landlock, rlimits, seccomp_filter
from pluginpool.tasks.context import PluginContext
from pluginpool.tasks.loader import import_entrypoint
from pluginpool.tasks.runner import check_result, error_from_exception
from pluginpool.tasks.spec import PluginSpec

PR_SET_PDEATHSIG = 1
CHANNEL_FD = 3
"""The run's end of the channel is moved here, so the seccomp filter (which names it) can
be compiled once per permission set."""
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
RESET_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                 signal.SIGALRM, signal.SIGCHLD)


@dataclass(frozen=True)
class ChildPlan:
    """Everything the run's process needs, decided in the pool child before the fork."""

    spec: PluginSpec
    workspace: str
    read_paths: tuple[str, ...]
    channel_fd: int
    vms_at_fork: int
    landlock_abi: int
    seccomp_program: bytes | None
    max_result_bytes: int


class ChannelStorage:
    """`ctx.storage` in a sandbox: each call is served by the supervisor, which holds the
    Redis connection and the quota; the run itself has no Redis connection at all."""

    def __init__(self, fd: int, policy: audit.AuditPolicy) -> None:
        self._fd = fd
        self._policy = policy

    def _call(self, action: str, **fields: Any) -> Any:
        channel.send(self._fd, {"op": "storage", "action": action, **fields})
        reply = channel.receive(self._fd, max_bytes=64 << 20)
        if reply.get("ok"):
            return reply.get("value")
        if reply.get("quota"):
            self._policy.violations.append({
                "type": str(ErrorType.RESOURCE), "message": "storage quota exceeded",
                "details": {"limit": "max_storage_kb", "limit_value": reply["limit_bytes"],
                            "observed": reply["observed_bytes"], "store": "kv"}})
            raise StorageQuotaExceeded(limit_bytes=reply["limit_bytes"],
                                       observed_bytes=reply["observed_bytes"])
        raise ValueError(reply.get("message", "storage request failed"))

    def get(self, key: str, default: Any = None) -> Any:
        value = self._call("get", key=key)
        return default if value is None else value

    def set(self, key: str, value: Any) -> int:
        return int(self._call("set", key=key, value=value))

    def delete(self, key: str) -> bool:
        return bool(self._call("delete", key=key))

    def keys(self) -> list[str]:
        return list(self._call("keys"))


def _isolate_process(channel_fd: int, workspace: str) -> None:
    """Own session, dies with its supervisor, default signals, no inherited descriptor but
    the channel (moved to CHANNEL_FD), no inherited environment."""
    os.setsid()
    # The worker's environment holds its secrets (broker URL, passwords): none of it stays.
    os.environ.clear()
    os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workspace,
                       "TMPDIR": workspace, "LANG": "C.UTF-8"})
    tempfile.tempdir = workspace
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the supervisor died: so do we
    for signum in RESET_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    if channel_fd != CHANNEL_FD:
        os.dup2(channel_fd, CHANNEL_FD, inheritable=False)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > CHANNEL_FD:
            with contextlib.suppress(OSError):
                os.close(fd)


def _lock_down(plan: ChildPlan) -> tuple[dict[str, Any], audit.AuditPolicy]:
    spec = plan.spec
    permissions = spec.permissions
    os.chdir(plan.workspace)
    layers: dict[str, Any] = {"process": "fork", "rlimits": rlimits.apply(
        spec.resource_limits, vms_at_fork=plan.vms_at_fork)}
    hosts = audit.parse_hosts(permissions.network_hosts)
    if plan.landlock_abi:
        ports = sorted({p for ps in hosts.values() if ps for p in ps}) if hosts else []
        any_port = any(p is None for p in hosts.values())
        layers["landlock"] = landlock.restrict_self(
            read_paths=plan.read_paths, write_paths=(plan.workspace, os.devnull),
            tcp_ports=None if any_port else ports, abi=plan.landlock_abi)
    else:
        layers["landlock"] = False
    if plan.seccomp_program is not None:
        seccomp_filter.load(plan.seccomp_program)
        layers["seccomp"] = {"processes": not permissions.allow_processes,
                             "network": not hosts}
    else:
        layers["seccomp"] = False
    policy = audit.AuditPolicy(
        workspace=plan.workspace, read_paths=plan.read_paths, hosts=hosts,
        max_network_requests=spec.resource_limits.max_network_requests,
        allow_processes=permissions.allow_processes)
    audit.install(policy)
    layers["audit_hook"] = True
    return layers, policy


def _error_message(exc: BaseException, spec: PluginSpec,
                   policy: audit.AuditPolicy | None) -> dict[str, Any]:
    if policy is not None and policy.violations:
        return {"ok": False, "error": policy.violations[0]}
    if isinstance(exc, PluginExecutionError):
        return {"ok": False, "error": exc.info.model_dump(mode="json")}
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return {"ok": False, "error": {
            "type": str(ErrorType.RESOURCE), "message": "a file outgrew the storage quota",
            "details": {"limit": "max_storage_kb",
                        "limit_value": spec.resource_limits.max_storage_kb}}}
    if isinstance(exc, PermissionError | OSError) and getattr(exc, "errno", None) in (
            errno.EPERM, errno.EACCES):
        return {"ok": False, "error": {
            "type": str(ErrorType.SECURITY),
            "message": f"operation refused by the sandbox: {exc}",
            "details": {"exception_type": type(exc).__name__, "attempted": str(exc)}}}
    return {"ok": False, "error": error_from_exception(spec, exc).info.model_dump(mode="json")}


def run_child(plan: ChildPlan, ctx: PluginContext, payload: Any,
              load: Callable[[PluginSpec], Any] = import_entrypoint) -> NoReturn:
    """Lock the process down, run the plugin, send one result frame, exit."""
    policy: audit.AuditPolicy | None = None
    reply: dict[str, Any]
    try:
        _isolate_process(plan.channel_fd, plan.workspace)
        plan = dataclasses.replace(plan, channel_fd=CHANNEL_FD)
        layers, policy = _lock_down(plan)
        channel.send(plan.channel_fd, {"op": "started", "layers": layers})
        function = load(plan.spec)
        ctx._storage = ChannelStorage(plan.channel_fd, policy)
        value = function(ctx, payload)
        if policy.violations:
            reply = {"ok": False, "error": policy.violations[0]}
        else:
            check_result(plan.spec, value, max_result_bytes=plan.max_result_bytes)
            reply = {"ok": True, "value": value}
    except BaseException as exc:  # everything the plugin raises ends as a typed error
        reply = _error_message(exc, plan.spec, policy)
    try:
        if policy is not None:
            reply["network_requests"] = policy.network_requests
        channel.send(plan.channel_fd, {"op": "result", **reply})
    except BaseException:  # the channel is gone or the value cannot be sent: just exit
        os._exit(3)
    os._exit(0)
