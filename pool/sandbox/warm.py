"""One warm sandbox, seen from the pool child: its zygote, set up once, forking each run.

`WarmSandbox.start` launches the zygote and supervises its setup exactly like a run (wall
clock `setup_timeout_ms`, memory, storage, CPU share); `spawn` hands it one run;
`retire` asks it to tear the plugin down and exit.
"""

from __future__ import annotations

import _socket
import base64
import contextlib
import os
import select
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from pluginpool.pool.sandbox import owners
from pluginpool.pool.sandbox.frames import (
    FrameDeadline,
    receive_by,
    send_by,
    send_with_fd_by,
)
from pluginpool.pool.sandbox.launcher import ZygoteLauncher, ZygoteStartError
from pluginpool.pool.sandbox.output import OutputPipes
from pluginpool.pool.sandbox.process_handle import ProcessHandle, UnverifiedProcess
from pluginpool.pool.sandbox.runtime import channel
from pluginpool.pool.sandbox.runtime.limits import MB
from pluginpool.pool.sandbox.runtime.messages import (
    Close,
    Closed,
    Exited,
    Forked,
    Hello,
    Ready,
    Spawn,
    StorageRequest,
    ZygoteConfig,
)
from pluginpool.pool.sandbox.supervisor import (
    DEFAULT_LOG_BYTES,
    Bounds,
    Exit,
    NotForked,
    StorageHandler,
    Supervision,
    Supervisor,
    entries_of,
    storage_reply,
)
from pluginpool.tasks.spec import PluginSpec

WarmKey = tuple[str, int, str | None]
"""(plugin id, revision, instance id): what a warm sandbox was set up for."""
CONTROL_MAX_BYTES = 1 << 20
EXIT_WAIT_S = 10.0
CLOSE_WAIT_S = 5.0
RETIRE_SEND_S = 0.2


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class ProcessGone:
    """Reaper for a process that is not our child (a detached zygote): it ended when the
    kernel no longer has it; its accounting went to its real parent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def reap(self, *, block: bool) -> Exit | None:
        deadline = time.monotonic() + (EXIT_WAIT_S if block else 0)
        while True:
            if _gone(self.pid):
                return Exit(sandbox_died=True)
            if time.monotonic() >= deadline:
                return Exit(sandbox_died=True) if block else None
            time.sleep(0.005)


class RunExitFromZygote:
    """Reaper for a run: its parent, the zygote, reaps it and sends Exited."""

    def __init__(self, control: socket.socket, run_pid: int) -> None:
        self.control = control
        self.run_pid = run_pid

    def reap(self, *, block: bool) -> Exit | None:
        if not block and not _readable(self.control):
            return None
        try:
            message = receive_by(self.control.fileno(), max_bytes=CONTROL_MAX_BYTES,
                                 deadline=time.monotonic() + EXIT_WAIT_S)
        except (channel.ChannelClosed, OSError, ValueError):  # FrameDeadline included
            return Exit(sandbox_died=True)
        if not isinstance(message, Exited) or message.pid != self.run_pid:
            return Exit(sandbox_died=True)
        return Exit(status=message.status, cpu_s=message.cpu_s, maxrss_kb=message.maxrss_kb)


def _readable(sock: socket.socket, timeout_s: float = 0.0) -> bool:
    """Something (or its end) can be read (poll, not select: descriptor numbers may pass
    1024)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLHUP)
    return bool(poller.poll(timeout_s * 1000))


def read_forked(control: socket.socket, timeout_s: float) -> Forked:
    """The zygote's answer to a Spawn, the run's Forked, whole within `timeout_s`;
    ChannelClosed if none comes or it answers something else."""
    try:
        forked = receive_by(control.fileno(), max_bytes=CONTROL_MAX_BYTES,
                            deadline=time.monotonic() + timeout_s)
    except FrameDeadline:
        raise channel.ChannelClosed from None
    if not isinstance(forked, Forked):
        raise channel.ChannelClosed
    return forked


class PendingRun:
    """A run handed to the zygote, its Forked not read yet: the supervisor reads it when it
    first needs the run's pid (supervisor.PendingFork), then reaps the run through the
    zygote's Exited. Forked is awaited until EXIT_WAIT_S after the Spawn, as spawn() does."""

    def __init__(self, control: socket.socket, deadline: float, zygote_pid: int) -> None:
        self.control = control
        self.deadline = deadline
        self.zygote_pid = zygote_pid
        self.pid: int | None = None
        self.process: ProcessHandle | None = None
        self.zygote_rss_bytes = 0
        self._failed = False

    def forked(self) -> tuple[ProcessHandle, int]:
        """The run, checked to be the zygote's child (a setup can make its zygote name any
        pid: process_handle.py); NotForked otherwise."""
        if self.process is None:
            if self._failed:
                raise NotForked
            self._failed = True
            try:
                message = read_forked(self.control, max(self.deadline - time.monotonic(), 0.0))
                self.process = ProcessHandle.open(message.pid, parent=self.zygote_pid)
            except (channel.ChannelClosed, OSError, ValueError, UnverifiedProcess) as exc:
                raise NotForked from exc
            self._failed = False
            self.pid, self.zygote_rss_bytes = message.pid, message.zygote_rss_bytes
        return self.process, self.zygote_rss_bytes

    def reap(self, *, block: bool) -> Exit | None:
        return RunExitFromZygote(self.control, self.forked()[0].pid).reap(block=block)


@dataclass
class WarmSandbox:
    key: WarmKey
    pid: int
    control: socket.socket
    home: str
    setup_ms: float
    rss_bytes: int
    layers: dict[str, Any]
    since: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    runs: int = 0
    busy: bool = False
    setup_supervision: Supervision | None = None
    storage: StorageHandler | None = None
    """Serves `ctx.storage` for the teardown (close() may persist state)."""
    retired_for: str | None = None
    workspace: str = ""
    """Every run's workspace: one directory (its Landlock rule is built once, by the
    zygote), emptied after each run; "" for a workspace per run."""
    workspace_times: tuple[int, int] = (0, 0)
    """Its (atime, mtime) when created, put back after each run."""
    tainted: bool = False
    """The workspace could not be emptied: the sandbox is retired, not used again."""
    output: OutputPipes | None = None
    """The pipes the zygote's descriptors 1 and 2 write to (output.py)."""
    process: ProcessHandle | None = None
    """The zygote, signalled through its pidfd (its pid may be reused once it is gone)."""
    owner_record: str | None = None
    """This pool process's record of owning the zygote (owners.py), dropped at its end."""

    @property
    def instance_id(self) -> str | None:
        return self.key[2]

    def clean_workspace(self, *, found_empty: bool = False) -> bool:
        """Empty the run workspace, as it was created (mode, times), so the next run sees
        nothing this one left; False (and the sandbox tainted) if anything stays.
        `found_empty`: the supervisor listed it after the run ended (Supervision's
        workspace_empty), so it is not listed again."""
        path = self.workspace
        try:
            if found_empty or _clear(path):
                stat = os.stat(path)
                if stat.st_mode & 0o7777 != 0o700:
                    os.chmod(path, 0o700)
                if (stat.st_atime_ns, stat.st_mtime_ns) != self.workspace_times:
                    os.utime(path, ns=self.workspace_times)
                return True
            os.chmod(path, 0o700)  # a run may have made it unreadable
            if _clear(path):
                os.utime(path, ns=self.workspace_times)
                return True
        except OSError:
            pass
        self.tainted = True
        return False

    def alive(self) -> bool:
        """Between runs the zygote sends nothing, so a readable control socket is its end
        (EOF: a dead process's descriptors close at once, and no run holds this one)."""
        try:
            return not _readable(self.control)
        except (OSError, ValueError):
            return False

    def spawn(self, spawn: Spawn, run_end: socket.socket) -> Forked:
        """Hand the zygote one run and its channel; it answers with the run's pid."""
        send_with_fd_by(self.control, spawn, run_end.fileno(), time.monotonic() + EXIT_WAIT_S)
        return read_forked(self.control, EXIT_WAIT_S)

    def start_run(self, spawn: Spawn, run_end: _socket.socket) -> PendingRun:
        """Hand the zygote one run and its channel, without waiting for its Forked: the
        Supervisor given this PendingRun (as `pending` and `reaper`) reads it."""
        send_with_fd_by(self.control, spawn, run_end.fileno(), time.monotonic() + EXIT_WAIT_S)
        return PendingRun(self.control, time.monotonic() + EXIT_WAIT_S, self.pid)

    def run_reaper(self, run_pid: int) -> RunExitFromZygote:
        return RunExitFromZygote(self.control, run_pid)

    def retire(self, reason: str) -> None:
        """Ask for the teardown (close()); the zygote exits after it."""
        self.retired_for = reason
        # Bounded: called under the warm pool's lock, and a zygote that stopped reading
        # its control socket must not hold it (finish() kills it after CLOSE_WAIT_S).
        with contextlib.suppress(OSError, FrameDeadline):
            send_by(self.control.fileno(), Close(reason=reason),
                    time.monotonic() + RETIRE_SEND_S)

    def finish(self, *, wait_s: float = CLOSE_WAIT_S) -> Closed | None:
        """Wait for the teardown's end (bounded; its storage calls are served), then make
        sure the zygote is gone and remove its home."""
        deadline = time.monotonic() + wait_s
        closed: Closed | None = None
        control = self.control.fileno()
        try:
            while closed is None:
                # Every read and write bounded by the deadline: a teardown that sends half a
                # frame, or asks for storage and never reads the reply, cannot hold the
                # housekeeper (or a pool process's exit) past it.
                message = receive_by(control, max_bytes=CONTROL_MAX_BYTES, deadline=deadline)
                if isinstance(message, Closed):
                    closed = message
                elif isinstance(message, StorageRequest) and self.storage is not None:
                    raw = self.storage({"action": message.action, "key": message.key,
                                        "value": message.value})
                    send_by(control, storage_reply(raw), deadline)
                else:
                    break
        except Exception:  # whatever the teardown sent: it ends here
            closed = None
        finally:
            self.kill()
        return closed

    def kill(self) -> None:
        process = self.process or ProcessHandle(self.pid, None)
        process.send_group(signal.SIGKILL)
        process.send(signal.SIGKILL)
        process.close()
        with contextlib.suppress(OSError):
            self.control.close()
        if self.output is not None:
            self.output.close()
        shutil.rmtree(self.home, ignore_errors=True)
        owners.forget(self.owner_record)


def _clear(path: str) -> bool:
    """Remove everything in `path`; whether it is empty now (listed without stamping its
    access time: supervisor.entries_of)."""
    entries = entries_of(path, sizes=False)
    if not entries:
        return True
    for name, is_dir, _size in entries:
        try:
            if is_dir:
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)
            else:
                os.unlink(os.path.join(path, name))
        except OSError:
            continue
    return not entries_of(path, sizes=False)


@dataclass(frozen=True)
class SetupPlan:
    """What the pool child decided for one zygote before starting it."""

    spec: PluginSpec
    instance_id: str | None
    initial_data: dict[str, Any]
    warm_root: str
    read_paths: tuple[str, ...]
    landlock_abi: int
    zygote_seccomp: bytes | None
    run_seccomp: bytes | None
    max_result_bytes: int
    max_log_bytes: int = DEFAULT_LOG_BYTES
    """The setup's output kept (shown with its error, or with the first job's logs)."""
    setup_s: float | None = None
    """The setup's wall clock, when less than the spec's (what an environment install left
    of it: both are within setup_timeout_ms, as Celery's limits count them)."""


def _b64(program: bytes | None) -> str | None:
    return base64.b64encode(program).decode() if program is not None else None


def start(launcher: ZygoteLauncher, plan: SetupPlan, *,
          storage: StorageHandler) -> tuple[WarmSandbox | None, Supervision]:
    """Launch a zygote and supervise its setup; the sandbox, or None and what went wrong."""
    spec = plan.spec
    os.makedirs(plan.warm_root, mode=0o700, exist_ok=True)
    home = os.path.realpath(tempfile.mkdtemp(prefix=f"{spec.id}-", dir=plan.warm_root))
    try:
        return _start_in(home, launcher, plan, storage=storage)
    except BaseException:  # a start interrupted (Celery's soft limit) or that could not
        shutil.rmtree(home, ignore_errors=True)  # start: its home goes with it
        raise


def _start_in(home: str, launcher: ZygoteLauncher, plan: SetupPlan, *,
              storage: StorageHandler) -> tuple[WarmSandbox | None, Supervision]:
    spec = plan.spec
    limits = spec.resource_limits
    setup_workspace = os.path.join(home, "setup")
    os.mkdir(setup_workspace, 0o700)
    run_workspace = os.path.join(home, "run")
    os.mkdir(run_workspace, 0o700)
    created = os.stat(run_workspace)
    hello: Hello
    hello, control, output = launcher.start()
    config = ZygoteConfig(
        plugin_id=spec.id, entrypoint=spec.entrypoint, operations=list(spec.operations),
        instance_id=plan.instance_id, initial_data=plan.initial_data,
        code_paths=list(launcher.code_paths), read_paths=list(plan.read_paths), home=home,
        setup_workspace=setup_workspace, landlock_abi=plan.landlock_abi,
        zygote_seccomp_b64=_b64(plan.zygote_seccomp), run_seccomp_b64=_b64(plan.run_seccomp),
        max_memory_mb=limits.max_memory_mb, max_storage_kb=limits.max_storage_kb,
        setup_cpu_s=spec.deadlines.setup_cpu_backstop_s,
        network_hosts=list(spec.permissions.network_hosts),
        max_network_requests=limits.max_network_requests,
        allow_processes=spec.permissions.allow_processes,
        max_result_bytes=plan.max_result_bytes, limits=limits.model_dump(mode="json"),
        permissions=spec.permissions.model_dump(mode="json"), run_workspace=run_workspace,
        run_cpu_backstop_s=spec.deadlines.cpu_backstop_s)
    sandbox = WarmSandbox(key=(spec.id, spec.revision, plan.instance_id), pid=hello.pid,
                          control=control, home=home, setup_ms=0.0, rss_bytes=hello.rss_bytes,
                          layers={}, workspace=run_workspace,
                          workspace_times=(created.st_atime_ns, created.st_mtime_ns),
                          output=output)
    try:
        sandbox.process = ProcessHandle.open(hello.pid)
    except (UnverifiedProcess, OSError) as exc:
        sandbox.kill()
        raise ZygoteStartError(f"the zygote (pid {hello.pid}) cannot be watched: {exc}") \
            from exc
    sandbox.owner_record = owners.record(plan.warm_root, hello.pid, home)
    try:
        channel.send_message(control.fileno(), config)
    except OSError:
        sandbox.kill()
        return None, Supervision()
    supervisor = Supervisor(
        hello.pid, control.fileno(),
        bounds=Bounds(timeout_s=plan.setup_s if plan.setup_s is not None
                      else spec.deadlines.setup_kill_s,
                      max_memory_bytes=limits.max_memory_mb * MB,
                      max_storage_bytes=limits.max_storage_kb * 1024,
                      cpu_percent=limits.max_cpu_percent, clock_name="setup_timeout_ms"),
        workspace=setup_workspace, baseline_rss=hello.rss_bytes, storage=storage,
        max_frame_bytes=CONTROL_MAX_BYTES, reaper=ProcessGone(hello.pid), kill_after=False,
        max_log_bytes=plan.max_log_bytes, output=output)
    try:
        out = supervisor.run()
    except BaseException:  # Celery's soft limit, a storage call failing: nothing kept
        sandbox.kill()
        raise
    if not isinstance(out.result, Ready):
        sandbox.kill()
        return None, out
    sandbox.setup_ms = out.result.setup_ms
    sandbox.rss_bytes = out.result.rss_bytes
    sandbox.layers = out.result.layers
    sandbox.setup_supervision = out
    sandbox.storage = storage
    return sandbox, out
