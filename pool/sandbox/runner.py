"""The sandboxed runner: every run is a fresh process forked from a warm sandbox.

Path of one run: check `requires.plugins` here (no plugin code) → take the warm sandbox of
(plugin, revision, instance), or start one (a fresh interpreter, with the revision's own
environment on its path when it has `requires.packages` (environments.py), that locks
itself down, imports the plugin and runs its setup, supervised like a run) → a workspace
inside the sandbox's home → socketpair → the zygote forks the run, which narrows its
limits further and runs the operation → the supervisor watches it (supervisor.py) → the
outcome becomes a value or a typed PluginExecutionError, with the run's usage either way
(outcome.py) → run killed and reaped, workspace removed. The pool child never runs plugin
code; a run sees the set-up state and nothing any earlier run did.
"""

from __future__ import annotations

import _socket
import dataclasses
import functools
import logging
import os
import socket
import sys
import tempfile
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_shutdown
from redis.exceptions import RedisError

from pluginpool.policy.errors import ErrorType, PluginExecutionError
from pluginpool.policy.storage import InstanceStorage
from pluginpool.pool.loader import check_requires
from pluginpool.pool.runner import RunReport
from pluginpool.pool.sandbox import outcome, seccomp_filter, warm
from pluginpool.pool.sandbox.environments import Environments, code_found_in
from pluginpool.pool.sandbox.housekeeping import Housekeeper
from pluginpool.pool.sandbox.launcher import ZygoteLauncher, ZygoteStartError
from pluginpool.pool.sandbox.runtime import channel, landlock
from pluginpool.pool.sandbox.runtime.limits import MB
from pluginpool.pool.sandbox.runtime.messages import Spawn
from pluginpool.pool.sandbox.runtime.run import CHANNEL_FD
from pluginpool.pool.sandbox.supervisor import Bounds, NotForked, Supervision, Supervisor
from pluginpool.pool.sandbox.warm_pool import WarmPool
from pluginpool.pool.worker_services import WorkerServices
from pluginpool.tasks.context import PluginContext
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec

SYSTEM_READ_PATHS = (
    "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/share/zoneinfo", "/etc/ssl",
    "/etc/ca-certificates", "/etc/localtime", "/etc/hosts", "/etc/resolv.conf",
    "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/services", "/etc/protocols", "/etc/host.conf",
    "/dev/urandom", "/dev/random", "/dev/null",
)
FRAME_OVERHEAD_BYTES = 64 * 1024
PROTOCOL_REASON_CHARS = 500
INSTALL_NOTICED_S = 0.05
"""Finding an environment already installed takes less: the setup keeps its whole clock."""
MIN_SETUP_S = 1.0
"""The least a setup gets after a long install (Celery's soft limit still bounds both)."""
logger = logging.getLogger(__name__)
STORAGES_KEPT = 256


class SandboxGone(Exception):
    """The warm sandbox was dead before the run started: start a new one."""


@functools.lru_cache(maxsize=256)
def read_paths(extra: tuple[str, ...]) -> tuple[str, ...]:
    """System files every run may read, plus `extra`; the zygote adds its own interpreter's
    paths (it may be another environment)."""
    return tuple(sorted({os.path.realpath(p) for p in (*SYSTEM_READ_PATHS, *extra)}))


def warm_root_of(settings: Settings) -> str:
    """Where this user's warm sandboxes keep their homes (and owners' records)."""
    return settings.warm_root or os.path.join(tempfile.gettempdir(),
                                              f"pluginpool-warm-{os.getuid()}")


def standalone_plan(spec: PluginSpec, *, code_paths: tuple[str, ...], warm_root: str,
                    max_result_bytes: int = 1 << 20) -> warm.SetupPlan:
    """A warm sandbox's setup plan outside a worker, for tools that start a zygote directly
    (benchmarks, tests): the filters a worker uses where seccomp is available, this
    kernel's Landlock ABI, and read access to the code."""
    seccomp = seccomp_filter.available()
    return warm.SetupPlan(
        spec=spec, instance_id=None, initial_data={}, warm_root=warm_root,
        read_paths=read_paths(code_paths), landlock_abi=landlock.abi_version(),
        zygote_seccomp=seccomp_filter.compile_filter(
            allow_processes=False, allow_network=False, channel_fd=None, allow_fork=True)
        if seccomp else None,
        run_seccomp=seccomp_filter.compile_filter(
            allow_processes=False, allow_network=False, channel_fd=CHANNEL_FD)
        if seccomp else None,
        max_result_bytes=max_result_bytes)


class SandboxRunner:
    """Implements the Runner protocol of pluginpool.pool.runner with warm sandboxes."""

    def __init__(self, services: WorkerServices, *, interpreter: str = sys.executable) -> None:
        self._services = services
        self._settings = services.settings
        self._interpreter = interpreter
        self._environments = Environments.from_settings(self._settings, interpreter=interpreter)
        self._landlock_abi = landlock.abi_version()
        self._seccomp = seccomp_filter.available()
        self._pool = WarmPool(capacity=self._settings.warm_sandboxes,
                              idle_s=self._settings.warm_idle_s)
        self._storages: dict[tuple[str, int], InstanceStorage] = {}
        self._housekeeper_of = 0
        self._housekeeper: Housekeeper | None = None
        self._warm_root = warm_root_of(self._settings)

    def _storage(self, scope: str, *, quota_bytes: int) -> InstanceStorage:
        """`ctx.storage` of an instance (or plugin), kept between runs: building one
        registers (hashes) its two Lua scripts."""
        key = (scope, quota_bytes)
        found = self._storages.get(key)
        if found is None:
            if len(self._storages) >= STORAGES_KEPT:
                self._storages.clear()
            found = self._storages[key] = InstanceStorage(
                self._services.redis, self._settings.keys, scope, quota_bytes=quota_bytes)
        return found

    @classmethod
    def factory(cls, services: WorkerServices) -> SandboxRunner:
        return cls(services)

    def launcher_for(self, spec: PluginSpec, ctx: PluginContext) -> ZygoteLauncher:
        """The interpreter and code paths of this plugin revision's zygote. With
        `requires.packages`, its own environment goes after its code (installed first if
        new here, within the setup budget), and when its code is in the code paths the
        zygote does not see the worker's site-packages at all."""
        code = (*ctx.code_paths, *self._settings.plugin_paths)
        if not spec.requires.packages:
            return ZygoteLauncher(interpreter=self._interpreter, code_paths=code)
        site = self._environments.site_for(spec, wait_s=spec.deadlines.setup_kill_s)
        return ZygoteLauncher(interpreter=self._interpreter,
                              code_paths=(*ctx.code_paths, site, *self._settings.plugin_paths),
                              site_packages=not code_found_in(spec, code))

    def _ensure_housekeeper(self, worker: str) -> None:
        if self._housekeeper_of != os.getpid():  # one per pool process, started in it
            self._pool = WarmPool(capacity=self._settings.warm_sandboxes,
                                  idle_s=self._settings.warm_idle_s)
            self._housekeeper = Housekeeper(self._pool, self._services.redis,
                                            self._settings.keys, worker=worker,
                                            warm_root=self._warm_root)
            self._housekeeper.start()
            worker_process_shutdown.connect(self._retire_all, weak=False)
            self._housekeeper_of = os.getpid()

    def _retire_all(self, **_: Any) -> None:
        """The pool process is exiting: every warm sandbox runs its teardown (each bounded)
        and its home is removed."""
        self._pool.retire_all()
        if self._housekeeper is not None:
            self._housekeeper.finish_retiring()

    def _seccomp_programs(self, spec: PluginSpec) -> tuple[bytes | None, bytes | None]:
        if not self._seccomp:
            return None, None
        permissions = spec.permissions
        network = bool(permissions.network_hosts)
        zygote = seccomp_filter.compile_filter(
            allow_processes=permissions.allow_processes, allow_network=network,
            channel_fd=None, allow_fork=True)
        run = seccomp_filter.compile_filter(
            allow_processes=permissions.allow_processes, allow_network=network,
            channel_fd=CHANNEL_FD)
        return zygote, run

    def run(self, spec: PluginSpec, ctx: PluginContext, payload: Any) -> RunReport:
        """One run, its value or its typed error. Whatever a sandbox sends is checked
        (messages.decode); should anything it sent still break the pool child's side, the
        run fails `runtime` (`protocol_error`) like any run, counted by the breaker, and
        that sandbox is not used again (`run` gives it back dead)."""
        try:
            return self._run(spec, ctx, payload)
        except (PluginExecutionError, SoftTimeLimitExceeded, RedisError, OSError):
            raise  # OSError: the pool child's own I/O (a full disk, no descriptors left), not
            # something the plugin did; as before, an untyped failure of the job
        except Exception as exc:
            logger.exception("sandboxed run of %s broke the sandbox protocol", spec.id)
            raise PluginExecutionError.of(
                ErrorType.RUNTIME, "the sandbox broke its protocol with the worker",
                plugin_id=spec.id, protocol_error=True,
                reason=f"{type(exc).__name__}: {exc}"[:PROTOCOL_REASON_CHARS]) from None

    def _run(self, spec: PluginSpec, ctx: PluginContext, payload: Any) -> RunReport:
        client = self._services.redis
        check_requires(spec, registered=lambda pid: bool(
            client.hexists(self._settings.keys.specs, pid)), packages_here=False)
        self._ensure_housekeeper(ctx.worker or socket.gethostname())
        storage = self._storage(ctx.instance_id or f"plugin:{spec.id}",
                                quota_bytes=spec.resource_limits.max_storage_kb * 1024)
        key = (spec.id, spec.revision, ctx.instance_id)
        setup: Supervision | None = None
        sandbox = self._pool.take(key)
        if sandbox is None:
            sandbox, setup = self._set_up(spec, ctx, storage)
        else:
            self._environments.note_use(spec)  # its environment stays on disk (env_gc.py)
        dead = True  # unless the run comes back: a sandbox is never left marked busy
        held: warm.WarmSandbox | None = sandbox  # given back once, whatever happens
        try:
            try:
                out, pid, baseline = self._run_once(sandbox, spec, ctx, payload, storage)
            except SandboxGone:  # it died since its last run: replaced, and the run goes on
                held = None
                self._pool.give_back(sandbox, dead=True)
                sandbox, setup = self._set_up(spec, ctx, storage)
                held = sandbox
                try:
                    out, pid, baseline = self._run_once(sandbox, spec, ctx, payload, storage)
                except SandboxGone:
                    raise PluginExecutionError.of(
                        ErrorType.RUNTIME, "the warm sandbox died before the run started",
                        plugin_id=spec.id, sandbox_died=True) from None
            dead = (out.exit is not None and out.exit.sandbox_died) or sandbox.tainted
            usage = outcome.usage_of(out, baseline_rss=baseline, sandbox=sandbox,
                                     run_pid=pid, setup=setup)
            sandbox.runs += 1
        finally:
            if held is not None:
                self._pool.give_back(held, dead=dead)
        # The job that set the sandbox up shows what its setup wrote first, as in process.
        logs = (setup.logs.followed_by(out.logs) if setup is not None else out.logs).text()
        try:
            report = outcome.run_report(spec, out, usage,
                                        max_result_bytes=self._settings.max_result_bytes)
        except PluginExecutionError as exc:
            exc.info.details["logs"] = logs
            raise
        return RunReport(value=report.value, usage=report.usage, logs=logs)

    def _set_up(self, spec: PluginSpec, ctx: PluginContext,
                storage: InstanceStorage) -> tuple[warm.WarmSandbox, Supervision]:
        zygote_filter, run_filter = self._seccomp_programs(spec)
        plan = warm.SetupPlan(
            spec=spec, instance_id=ctx.instance_id, initial_data=ctx.initial_data,
            warm_root=self._warm_root,
            read_paths=read_paths((*self._settings.plugin_paths, *ctx.code_paths,
                                   *spec.permissions.read_paths)),
            landlock_abi=self._landlock_abi, zygote_seccomp=zygote_filter,
            run_seccomp=run_filter, max_result_bytes=self._settings.max_result_bytes,
            max_log_bytes=self._settings.max_log_bytes)
        try:
            started = time.monotonic()
            launcher = self.launcher_for(spec, ctx)  # may install the environment first
            installed_s = time.monotonic() - started
            if installed_s > INSTALL_NOTICED_S:  # the setup gets what is left of the budget
                plan = dataclasses.replace(plan, setup_s=max(
                    spec.deadlines.setup_kill_s - installed_s, MIN_SETUP_S))
            sandbox, out = warm.start(launcher, plan, storage=storage.handle)
        except ZygoteStartError as exc:
            raise PluginExecutionError.of(
                ErrorType.RUNTIME, "the warm sandbox could not start", plugin_id=spec.id,
                phase="setup", reason=str(exc)) from None
        except SoftTimeLimitExceeded:
            raise PluginExecutionError.of(
                ErrorType.TIMEOUT, "setup exceeded the job's time limit", plugin_id=spec.id,
                phase="setup", limit="setup_timeout_ms",
                limit_value=spec.resource_limits.setup_timeout_ms) from None
        if sandbox is None:
            error = outcome.setup_error(spec, out)
            error.info.details["logs"] = out.logs.text()
            raise error
        self._pool.add(sandbox)
        return sandbox, out

    def _run_once(self, sandbox: warm.WarmSandbox, spec: PluginSpec, ctx: PluginContext,
                  payload: Any, storage: InstanceStorage) -> tuple[Supervision, int, int]:
        """One run forked from the sandbox: its supervision, pid and the zygote's size."""
        limits = spec.resource_limits
        deadlines = spec.deadlines
        workspace = sandbox.workspace
        ours, theirs = _socket.socketpair()
        found_empty = False
        try:
            try:
                pending = sandbox.start_run(Spawn(
                    job_id=ctx.job_id, operation=ctx.operation, payload=payload,
                    attempt=ctx.attempt, workspace=workspace,
                    cpu_backstop_s=deadlines.cpu_backstop_s, max_memory_mb=limits.max_memory_mb,
                    max_storage_kb=limits.max_storage_kb), theirs)
            except (channel.ChannelClosed, OSError, ValueError) as exc:
                raise SandboxGone from exc
            finally:
                theirs.close()
            # Its Forked is read when the supervisor first needs the pid (supervisor.py).
            supervisor = Supervisor(
                None, ours.fileno(),
                bounds=Bounds(timeout_s=deadlines.run_kill_s,
                              max_memory_bytes=limits.max_memory_mb * MB,
                              max_storage_bytes=limits.max_storage_kb * 1024,
                              cpu_percent=limits.max_cpu_percent),
                workspace=workspace, baseline_rss=0, storage=storage.handle,
                max_frame_bytes=self._settings.max_result_bytes + FRAME_OVERHEAD_BYTES,
                reaper=pending, pending=pending, max_log_bytes=self._settings.max_log_bytes,
                output=sandbox.output)
            try:
                out = supervisor.run()
                found_empty = out.workspace_empty
            except NotForked as exc:
                raise SandboxGone from exc
            except SoftTimeLimitExceeded:
                # Celery's soft limit reached the pool child: same meaning as our clock.
                out = supervisor.out
                out.killed_for, out.observed = "timeout", float(limits.timeout_ms)
            return out, pending.pid or 0, pending.zygote_rss_bytes
        finally:
            ours.close()
            if not sandbox.clean_workspace(found_empty=found_empty):
                sandbox.retire("its run workspace could not be emptied")
