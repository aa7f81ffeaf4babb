"""A warm sandbox's zygote: a fresh interpreter that locks itself down, imports the plugin,
runs its setup once, then only forks one process per run.

Started by the pool child (launcher.py) with its control socket's descriptor number as
the only argument. It detaches (so it is not a process of the worker's), reads its
ZygoteConfig, and from then on answers Spawn and Close. Control-socket EOF means its pool
child is gone: it tears the plugin down and exits.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import os
import select
import signal
import sys
import time
from _socket import CMSG_SPACE, SCM_RIGHTS, SOL_SOCKET
from _socket import socket as raw_socket

from . import channel, landlock, limits, logs, seccomp
from .audit import AuditPolicy, install, parse_hosts
from .classify import describe, error_of
from .context import ChannelStorage, SandboxContext
from .leftovers import PR_SET_CHILD_SUBREAPER, TEARDOWN_ALONE_S
from .leftovers import kill_children as _kill_leftovers
from .libc import open_libc
from .messages import (
    RUNTIME,
    Close,
    Closed,
    Hello,
    Ready,
    RunError,
    SetupFailed,
    ZygoteConfig,
    decode,
    exited_frame,
)
from .plugin import LoadedPlugin, LoadError, import_target
from .run import (
    CHANNEL_FD,
    CONTROL_FD,
    Runs,
    landlock_ports,
    note_fd_bound,
    note_stdio,
    rehearse,
    reset_signals,
    run_child,
)

_libc = open_libc()

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

CONFIG_MAX_BYTES = 64 << 20


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
HEADER_BYTES = channel.HEADER.size
FD_SPACE = CMSG_SPACE(4)
"""Ancillary room for the one descriptor a Spawn carries."""


def _sizes() -> tuple[int, int]:
    """(resident, virtual) bytes of this process."""
    with open("/proc/self/statm", "rb") as statm:
        fields = statm.read().split()
    return int(fields[1]) * PAGE_SIZE, int(fields[0]) * PAGE_SIZE


def _rss_bytes() -> int:
    return _sizes()[0]


def _detach(control_fd: int, *, guarded: bool) -> None:
    """Out of the worker's process tree: started by a guardian (guardian.py), already in a
    session of its own; started by the pool child itself, by forking away (the pool child
    reaps the intermediate process). Keep only the control socket, as fd 3, and become the
    reaper of whatever a run leaves."""
    if not guarded:
        if os.fork() > 0:
            os._exit(0)
        os.setsid()
    # The linker has read it (launcher.ZYGOTE_ENV); the plugin and its processes never see it.
    os.environ.pop("LD_BIND_NOW", None)
    if control_fd != CONTROL_FD:
        os.dup2(control_fd, CONTROL_FD, inheritable=False)
    os.set_inheritable(CONTROL_FD, False)  # a guardian's exec left it inheritable
    # 1 and 2 stay the pipes the pool child reads (pool/sandbox/output.py): what the setup
    # and the runs write there directly is logged too. Runs check they still are.
    os.dup2(os.open(os.devnull, os.O_RDWR), 0)
    note_stdio()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > CONTROL_FD:
            with contextlib.suppress(OSError):
                os.close(fd)
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)


class PoolChildWatch:
    """Ends the zygote when its pool child goes while the setup runs.

    The pool child is what bounds a setup's wall time (its supervisor kills the zygote at
    `setup_timeout_ms`). If it dies first (its worker SIGKILLed, the pool child recycled),
    a setup that sleeps or waits on the network would outlive it by as long as it likes:
    the zygote has left the worker's tree and has no parent to die with. So during the
    setup the control socket signals (O_ASYNC: SIGIO when it becomes readable, a storage
    reply or its end) and the handler ends the zygote at its end; a storage call or a
    report that finds the socket gone does the same (no SIGIO comes to a process blocked
    reading the socket), and SIGPIPE is ignored meanwhile (a write to the gone socket
    would otherwise kill the zygote before its leftovers are killed and its home emptied).
    Plugin code in the same process could undo all this; it covers setups that hang. What
    it does not cover, its guardian does (guardian.py): it kills the zygote once its grace
    is over."""

    def __init__(self, home: str, policy: AuditPolicy) -> None:
        self.home = home
        self.policy = policy
        self.pid = os.getpid()
        self.active = False
        self.plugin: LoadedPlugin | None = None
        """Once set up: torn down (close()) if the pool child goes before the runs start."""

    def start(self) -> None:
        import fcntl  # not at the top: imported modules cost every fork
        self.active = True
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signal.SIGIO, self._on_io)
            fcntl.fcntl(CONTROL_FD, fcntl.F_SETOWN, self.pid)
            fcntl.fcntl(CONTROL_FD, fcntl.F_SETFL,
                        fcntl.fcntl(CONTROL_FD, fcntl.F_GETFL) | os.O_ASYNC)
        self.check()  # gone already: setting O_ASYNC raises no signal for an end seen before

    def stop(self) -> None:
        """Before the zygote serves runs (they inherit its socket and dispositions)."""
        import fcntl
        self.active = False
        with contextlib.suppress(OSError, ValueError):
            fcntl.fcntl(CONTROL_FD, fcntl.F_SETFL,
                        fcntl.fcntl(CONTROL_FD, fcntl.F_GETFL) & ~os.O_ASYNC)
        with contextlib.suppress(OSError, ValueError):
            fcntl.fcntl(CONTROL_FD, fcntl.F_SETOWN, 0)
        for signum in (signal.SIGIO, signal.SIGPIPE):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(signum, signal.SIG_DFL)

    def check(self) -> None:
        """End the zygote if its pool child is gone (in the zygote, during the setup)."""
        if self.active and os.getpid() == self.pid and pool_child_gone():
            self.end()

    def end(self) -> NoReturn:
        self.active = False  # once: a close() using storage must not come back here
        try:  # whatever fails on the way (memory, a deep stack): the zygote still ends
            for outbox in logs._outbox:  # nobody reads the output now: it goes nowhere
                outbox.active = False
            self.policy.enforcing = False  # the setup's checks: not for emptying the home
            _teardown(self.plugin, self.policy if self.plugin is not None else None,
                      "pool child gone", self.home)
        finally:
            os._exit(0)

    def report(self, message: SetupFailed | Ready) -> None:
        """A setup's outcome to the pool child; if it is gone, end as above."""
        self.check()
        try:
            channel.send_message(CONTROL_FD, message)
        except OSError:
            self.end()

    def _on_io(self, _signum: int, _frame: object) -> None:
        self.check()


def _flush_logs(watch: PoolChildWatch) -> None:
    """What a failed setup wrote, before its error; nothing if its pool child is gone."""
    watch.check()
    with contextlib.suppress(OSError):
        logs.flush_all()


def pool_child_gone() -> bool:
    """The control socket's other end is closed (its pool child died or let it go)."""
    poller = select.poll()
    poller.register(CONTROL_FD, select.POLLHUP)
    return any(events & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
               for _fd, events in poller.poll(0))


def _lock_down(config: ZygoteConfig, policy: AuditPolicy) -> dict[str, Any]:
    """The zygote's layers, before any plugin code: they bound the setup and every run."""
    os.chdir(config.setup_workspace)
    os.environ.update({"HOME": config.setup_workspace, "TMPDIR": config.setup_workspace})
    layers: dict[str, Any] = {"rlimits": limits.apply_zygote(
        max_memory_mb=config.max_memory_mb, max_storage_kb=config.max_storage_kb,
        setup_cpu_s=config.setup_cpu_s)}
    if config.landlock_abi:
        # Its own /proc entry stays readable (sizes, threads, children); not its runs'.
        own_proc = os.path.realpath("/proc/self")
        layers["landlock"] = landlock.restrict_self(
            read_paths=(*config.read_paths, own_proc), write_paths=(config.home, os.devnull),
            tcp_ports=landlock_ports(config.network_hosts), abi=config.landlock_abi)
    if config.zygote_seccomp_b64 is not None:
        seccomp.load(base64.b64decode(config.zygote_seccomp_b64))
        layers["seccomp"] = True
    install(policy)
    return layers


def _teardown(plugin: LoadedPlugin | None, policy: AuditPolicy | None, reason: str,
              home: str) -> NoReturn:
    error: RunError | None = None
    teardown = False
    # Closed goes to a socket whose reader may be gone: a failed write, not death by
    # SIGPIPE before the leftovers are killed and the home emptied.
    with contextlib.suppress(OSError, ValueError):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # Nobody reads the output pipes now (and after the pool child's end nobody can): what
    # the teardown writes to 1 and 2 must neither block it nor kill it with SIGPIPE.
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:  # out of descriptors, or a hook the setup installed: writes just fail
        null = -1
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if null >= 0:
                os.dup2(null, fd)
            else:
                os.close(fd)
    if plugin is not None and policy is not None:
        # Bounded here too: with the pool child gone nobody else would stop a close() that
        # hangs (SIGALRM's default action ends the process).
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(TEARDOWN_ALONE_S)
        policy.enforcing = True
        try:
            teardown = plugin.close()
        except BaseException as exc:  # the teardown's failure is reported, then we exit
            teardown = True
            error = RunError(RUNTIME, f"teardown failed: {describe(exc)}")
        policy.enforcing = False
    with contextlib.suppress(OSError):
        channel.send_message(CONTROL_FD, Closed(error=error, teardown=teardown))
    try:
        _kill_leftovers()
        if reason == "pool child gone":  # nobody is left to remove the home: empty it
            _empty(home)
    finally:
        os._exit(0)


def _empty(path: str, depth: int = 0) -> None:
    """Remove what `path` holds, as far as it can (no import: this may run in a signal
    handler, inside a setup holding the import lock)."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for entry in entries:
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                if depth < 64:  # a deeper tree is left to the housekeeper's sweep
                    _empty(entry.path, depth + 1)
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)


class Control:
    """The zygote's end of its control socket: frames in, with the descriptor a Spawn
    carries (SCM_RIGHTS, sent with the frame), and the poller a run is waited on with."""

    def __init__(self) -> None:
        # A socket object over a duplicate of the descriptor, for recvmsg.
        self.sock = raw_socket(fileno=os.dup(CONTROL_FD))  # _socket's: see channel.py
        self.poller = select.poll()
        self.poller.register(CONTROL_FD, select.POLLIN | select.POLLHUP)

    def receive(self) -> tuple[bytes, int | None]:
        """One frame's bytes and the descriptor that came with it (only a Spawn has one)."""
        header, ancillary, _flags, _addr = self.sock.recvmsg(HEADER_BYTES, FD_SPACE)
        if not header:
            raise channel.ChannelClosed
        fd: int | None = None
        for level, kind, data in ancillary:
            if level == SOL_SOCKET and kind == SCM_RIGHTS:
                for offset in range(0, len(data) - len(data) % 4, 4):
                    passed = int.from_bytes(data[offset:offset + 4], sys.byteorder)
                    if fd is None:
                        fd = passed
                    else:
                        os.close(passed)
        if len(header) < HEADER_BYTES:
            header += channel.read_exactly(CONTROL_FD, HEADER_BYTES - len(header))
        size = int.from_bytes(header, "big")
        if size > CONFIG_MAX_BYTES:
            raise channel.FrameTooLarge(size, CONFIG_MAX_BYTES)
        return channel.read_exactly(CONTROL_FD, size), fd


def _statm(fd: int) -> tuple[int, int]:
    """(resident, virtual) bytes of this process, from its statm kept open."""
    fields = os.pread(fd, 128, 0).split()
    return int(fields[1]) * PAGE_SIZE, int(fields[0]) * PAGE_SIZE


def _serve_run(runs: Runs, body: bytes, run_fd: int, control: Control, statm: int) -> bool:
    """Fork one run (it says Forked and decodes its own Spawn), wait for it, report its
    exit. False: the pool child is gone."""
    rss, vms = _statm(statm)
    runs.refresh(vms)
    pid = os.fork()
    if pid == 0:
        run_child(runs, body, run_fd, rss, vms)  # it says Forked itself
    # Every page written here while the run lives is a copy: as little as possible.
    os.close(run_fd)
    pidfd = os.pidfd_open(pid)
    poller = control.poller
    poller.register(pidfd, select.POLLIN)
    alive = True
    try:
        while alive:
            for fd, _events in poller.poll():
                if fd == pidfd:
                    break
                alive = False  # the pool child died mid-run: so does the run
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            else:
                continue
            break
    finally:
        poller.unregister(pidfd)
        os.close(pidfd)
    _pid, status, usage = os.wait4(pid, 0)
    # Always: a run that cannot fork may still have started a process before its filter
    # loaded (an audit hook the setup installed fires on the run's own lock-down calls).
    _kill_leftovers()
    if alive:
        channel.send_frame(CONTROL_FD, exited_frame(
            pid, status, usage.ru_utime + usage.ru_stime, usage.ru_maxrss))
    return alive


def own_read_paths(extra: list[str]) -> list[str]:
    """This interpreter's prefixes and import paths (it may be another environment than
    the worker's), plus what the worker passed (system files, plugin paths, read_paths)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *extra}
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    paths.add(os.path.dirname(os.path.abspath(__file__)))
    return sorted(os.path.realpath(p) for p in paths)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _threads_left() -> RunError:
    return RunError(
        RUNTIME, f"setup left {_threads() - 1} thread(s) running; a warm sandbox forks its "
        "runs and must be single-threaded when set up",
        {"phase": "setup", "threads": _threads()})


def main() -> NoReturn:
    _detach(int(sys.argv[1]), guarded=sys.argv[2:] == ["guarded"])
    channel.send_message(CONTROL_FD, Hello(pid=os.getpid(), rss_bytes=_rss_bytes()))
    config = channel.receive_message(CONTROL_FD, max_bytes=CONFIG_MAX_BYTES)
    if not isinstance(config, ZygoteConfig):
        os._exit(2)
    policy = AuditPolicy(workspace=config.setup_workspace, read_paths=tuple(config.read_paths),
                         hosts=parse_hosts(config.network_hosts),
                         max_network_requests=config.max_network_requests,
                         allow_processes=config.allow_processes)
    watch = PoolChildWatch(config.home, policy)
    watch.start()
    started, cpu_started = time.perf_counter(), time.process_time()
    plugin: LoadedPlugin | None = None
    sys.dont_write_bytecode = True  # the code paths are read-only inside the sandbox
    for path in reversed(config.code_paths):
        if path not in sys.path:
            sys.path.insert(0, path)
    config.read_paths = own_read_paths(config.read_paths)
    policy.read_paths = tuple(config.read_paths)
    # The setup's output goes to the pool child's setup supervisor (shown with the error
    # of a setup that fails, and with the logs of the job that set the sandbox up).
    logs.unbuffer_descriptors()
    logs.prepare(CONTROL_FD)
    logs.capture()
    try:
        layers = _lock_down(config, policy)
        note_fd_bound()
        ctx = SandboxContext(
            plugin_id=config.plugin_id, job_id=None, instance_id=config.instance_id,
            attempt=0, operation=None, limits=config.limits, permissions=config.permissions,
            initial_data=config.initial_data, workspace=config.setup_workspace,
            storage=ChannelStorage(CONTROL_FD, policy, on_closed=watch.check))
        policy.enforcing = True
        plugin = LoadedPlugin(import_target(config.entrypoint), config.operations, ctx)
        policy.enforcing = False
        if policy.violations:
            raise PermissionError("the setup attempted what its permissions forbid")
        if _threads() > 1:
            raise LoadError(_threads_left())
    except LoadError as exc:
        policy.enforcing = False
        _flush_logs(watch)
        watch.report(SetupFailed(error=exc.error))
        os._exit(0)
    except BaseException as exc:  # the setup's failure is typed like a run's
        policy.enforcing = False
        _flush_logs(watch)
        error = error_of(exc, policy=policy, max_memory_mb=config.max_memory_mb,
                         max_storage_kb=config.max_storage_kb,
                         timeout_ms=int(config.limits["setup_timeout_ms"]))
        watch.report(SetupFailed(error=error))
        os._exit(0)
    watch.plugin = plugin
    logs.release()
    limits.after_setup()
    # Done once here rather than in every run (each run inherits them): default signal
    # dispositions (below, after the last plugin code), no privilege gain (the runs'
    # Landlock and seccomp layers need it), the run's log streams, its workspace, ctx,
    # Landlock layer and limits.
    seccomp.set_no_new_privs()
    logs.prepare(CHANNEL_FD)
    program = config.run_seccomp_b64
    run_filter = seccomp.Prepared(base64.b64decode(program)) if program is not None else None
    try:  # descriptors it needs: a setup may have left none free (out of files)
        runs = Runs(config, plugin, policy, run_filter)
        control = Control()
        statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        runs.refresh(_statm(statm)[1])
        rehearse(runs)  # before the heap is frozen
        gc.collect()
        gc.freeze()  # runs then never dirty (copy) the set-up heap's pages in their GC
        # After the collection: a setup's finalizers and gc callbacks run there, plugin
        # code that could start a process or a thread, or install a signal handler (one
        # for SIGCHLD that forks again would outlast the kill), after the checks above.
        reset_signals()
        _kill_leftovers()  # whatever the setup started
        threads = _threads()
    except OSError as exc:
        watch.report(SetupFailed(error=error_of(
            exc, policy=None, max_memory_mb=config.max_memory_mb,
            max_storage_kb=config.max_storage_kb,
            timeout_ms=int(config.limits["setup_timeout_ms"]))))
        os._exit(0)
    if threads > 1:
        watch.report(SetupFailed(error=_threads_left()))
        os._exit(0)
    watch.report(Ready(
        pid=os.getpid(), setup_ms=(time.perf_counter() - started) * 1000,
        setup_cpu_ms=(time.process_time() - cpu_started) * 1000, rss_bytes=_rss_bytes(),
        layers=layers))
    watch.stop()  # before the first Spawn can be read: runs are forked after it
    while True:
        try:
            body, run_fd = control.receive()
            if run_fd is None:  # anything but a Spawn
                message = decode(channel.loads(body))
        except (channel.ChannelClosed, OSError, ValueError):
            _teardown(plugin, policy, "pool child gone", config.home)
        if run_fd is not None:
            if not _serve_run(runs, body, run_fd, control, statm):
                _teardown(plugin, policy, "pool child gone", config.home)
        elif isinstance(message, Close):
            _teardown(plugin, policy, message.reason, config.home)
