"""One run's process: forked from the zygote, narrowed further, the operation, one result.

Nothing here returns: the process ends with os._exit, whatever the plugin does.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from json import dumps as _dumps
from typing import Any, NoReturn

from . import channel, landlock, limits, logs, seccomp
from .audit import AuditPolicy
from .classify import error_of
from .context import ChannelStorage, SandboxContext
from .libc import open_libc
from .messages import (
    RESOURCE,
    RUNTIME,
    Result,
    RunError,
    Spawn,
    ZygoteConfig,
    result_frame,
    started_frame,
    started_prefix,
)
from .plugin import LoadedPlugin

_libc = open_libc()

CHANNEL_FD = 3
"""The run's channel is moved here (over the zygote's control socket, which the run must
not keep), so the seccomp filter that protects it can be compiled once."""
PR_SET_PDEATHSIG = 1
RESET_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                 signal.SIGALRM, signal.SIGCHLD)
"""Reset to their defaults once, in the set-up zygote (runs inherit them): a run starts
with default signal dispositions whatever the setup installed."""
_prctl = _libc.prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                   ctypes.c_ulong)
_getrusage = resource.getrusage
_RUSAGE_SELF = resource.RUSAGE_SELF
_perf = time.perf_counter


def _cpu_s() -> float:
    usage = _getrusage(_RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reset_signals() -> None:
    """In the zygote after the setup: every run starts from default dispositions."""
    for signum in RESET_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)


def _isolate(run_fd: int, prepared: Prepared) -> None:
    """Own session, dies with its zygote, only its channel open (its working directory,
    environment and signal dispositions were set by the zygote before the fork)."""
    os.setsid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.dup2(run_fd, CHANNEL_FD, inheritable=False)
    # /proc is not readable here (Landlock); the zygote's RLIMIT_NOFILE bounds the fds.
    os.closerange(CHANNEL_FD + 1, prepared.max_fds)


@dataclass
class Prepared:
    """What the zygote builds for a run before forking it, so that the run (whose every
    touched page is a copy) only applies it."""

    ruleset_fd: int | None
    ruleset_owned: bool
    """The ruleset was built for this run alone: the zygote closes it after the fork."""
    seccomp: seccomp.Prepared | None
    rlimits: limits.RunLimits
    started: bytes
    """The Started frame up to its CPU figure (messages.started_prefix)."""
    max_fds: int
    ctx: SandboxContext


RunLayer = tuple[int, dict[str, object]]
"""A run's Landlock ruleset (not enforced) and what it reports."""


def run_layer(config: ZygoteConfig, workspace: str) -> RunLayer | None:
    """The Landlock layer of a run in `workspace`: writes only there, no signals to the
    zygote (None without Landlock)."""
    if not config.landlock_abi:
        return None
    return landlock.build_ruleset(
        read_paths=None, write_paths=(workspace, os.devnull),
        tcp_ports=landlock_ports(config.network_hosts), abi=config.landlock_abi)


def prepare(config: ZygoteConfig, spawn: Spawn, run_filter: seccomp.Prepared | None,
            vms_bytes: int, policy: AuditPolicy, shared_layer: RunLayer | None) -> Prepared:
    """In the zygote: the run's Landlock layer (`shared_layer`, built once, when the run
    gets the sandbox's one run workspace), built but not enforced; its rlimits and the
    layers it reports; the run's working directory and environment (inherited across the
    fork); its ctx and audit policy."""
    os.chdir(spawn.workspace)
    if os.environ.get("HOME") != spawn.workspace:
        os.environ["HOME"] = os.environ["TMPDIR"] = spawn.workspace
        tempfile = sys.modules.get("tempfile")  # not imported here: it seeds random at fork
        if tempfile is not None:
            tempfile.tempdir = spawn.workspace  # type: ignore[attr-defined]
    owned = shared_layer is None or spawn.workspace != config.run_workspace
    layer = run_layer(config, spawn.workspace) if owned else shared_layer
    fd, info = layer if layer is not None else (None, None)
    rlimits, rlimit_layer = limits.plan_run(
        vms_bytes=vms_bytes, max_memory_mb=spawn.max_memory_mb,
        max_storage_kb=spawn.max_storage_kb, cpu_backstop_s=spawn.cpu_backstop_s)
    layers: dict[str, Any] = {
        "process": "fork", "zygote": True, "rlimits": rlimit_layer,
        "landlock": info or False,
        "seccomp": {"processes": not config.allow_processes,
                    "network": not config.network_hosts} if run_filter is not None else False,
        "audit_hook": True}
    policy.narrow(workspace=spawn.workspace)
    policy.allow_processes = config.allow_processes
    ctx = SandboxContext(
        plugin_id=config.plugin_id, job_id=spawn.job_id, instance_id=config.instance_id,
        attempt=spawn.attempt, operation=spawn.operation, limits=config.limits,
        permissions=config.permissions, initial_data=config.initial_data,
        workspace=spawn.workspace, storage=ChannelStorage(CHANNEL_FD, policy))
    return Prepared(ruleset_fd=fd, ruleset_owned=owned, seccomp=run_filter, rlimits=rlimits,
                    started=started_prefix(layers),
                    max_fds=resource.getrlimit(resource.RLIMIT_NOFILE)[1], ctx=ctx)


def landlock_ports(entries: list[str]) -> list[int] | None:
    """TCP ports a Landlock layer allows: None (unrestricted) when a host has any port."""
    from .audit import parse_hosts
    hosts = parse_hosts(entries)
    if any(ports is None for ports in hosts.values()):
        return None
    return sorted({port for ports in hosts.values() if ports for port in ports})


def _encoded(value: Any, max_bytes: int) -> bytes | RunError:
    """The value as JSON, encoded once, or why it cannot be the result."""
    try:
        data = _dumps(value, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        return RunError(RUNTIME, f"result is not JSON-serialisable: {exc}",
                        {"result_type": type(value).__name__})
    if len(data) > max_bytes:
        return RunError(RESOURCE, "result is larger than the result limit",
                        {"limit": "max_result_bytes", "limit_value": max_bytes,
                         "observed": len(data)})
    return data


def run_child(config: ZygoteConfig, spawn: Spawn, run_fd: int, plugin: LoadedPlugin,
              policy: AuditPolicy, prepared: Prepared) -> NoReturn:
    """Narrow, call the operation, send one Result frame, exit (no interpreter teardown)."""
    failed: Result | None = None
    value_json = b"null"
    spent = (0.0, 0.0)
    try:
        if prepared.ruleset_fd is not None:
            # no_new_privs is already set: the zygote set it after its setup.
            landlock.restrict(prepared.ruleset_fd)  # _isolate closes its descriptor
        _isolate(run_fd, prepared)
        limits.apply_run(prepared.rlimits)
        if prepared.seccomp is not None:
            prepared.seccomp.load(no_new_privs_set=True)
        channel.send_frame(CHANNEL_FD, started_frame(prepared.started, _cpu_s()))
        logs.capture()
        operation = plugin.operations[spawn.operation]
        policy.enforcing = True
        op_cpu, op_started = _cpu_s(), _perf()
        try:
            value = operation(prepared.ctx, spawn.payload)
        finally:  # the run alone: the plugin's call, not the sandbox around it
            spent = (_cpu_s() - op_cpu, _perf() - op_started)
        policy.enforcing = False
        if policy.violations:
            raise PermissionError("the run attempted what its permissions forbid")
        encoded = _encoded(value, config.max_result_bytes)
        if isinstance(encoded, RunError):
            failed = Result(ok=False, error=encoded)
        else:
            value_json = encoded
    except BaseException as exc:  # everything the plugin raises ends as a typed error
        policy.enforcing = False
        failed = Result(ok=False, error=error_of(
            exc, policy=policy, max_memory_mb=spawn.max_memory_mb,
            max_storage_kb=spawn.max_storage_kb, timeout_ms=int(config.limits["timeout_ms"])))
    logs.flush_all()
    try:
        if failed is None:
            channel.send_frame(CHANNEL_FD, result_frame(
                value_json, network_requests=policy.network_requests, cpu_s=spent[0],
                wall_s=spent[1]))
        else:
            failed.network_requests = policy.network_requests
            failed.cpu_s, failed.wall_s = spent
            channel.send_message(CHANNEL_FD, failed)
    except BaseException:  # the channel is gone or the value cannot be sent: just exit
        os._exit(3)
    os._exit(0)
