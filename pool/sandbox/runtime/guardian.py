"""The zygotes' guardian: one small process per pool child, above its zygotes, that runs
no plugin code.

A zygote leaves the worker's tree (it must not be the pool child's child: it has to
outlive nothing of the worker's and be nothing Celery reaps or counts), so it has no
parent to die with. What it does itself when its pool child goes (zygote.PoolChildWatch)
runs in the process that holds plugin code, which can undo it or be stopped by its
throttle, and a process its setup starts in a session of its own is no longer in its
process group, which is what gets killed. So a pool child starts its zygotes through a
guardian (pool/sandbox/guardians.py starts it, the first time one is needed): a fresh
interpreter, detached from the worker like a zygote, that

- forks and executes each zygote (Launch), so it is every zygote's parent, and is a child
  subreaper: whatever a zygote's tree orphans when that zygote dies comes to it;
- when a zygote ends, however, kills what it left (every child of the guardian that is
  not a zygote: a live zygote is the subreaper of its own tree) and reaps it;
- when the request socket ends while its pool child lives, takes no more launches but
  guards the zygotes it has, and exits once they are gone;
- watches its pool child by pidfd; when it is gone, leaves the zygotes
  TEARDOWN_GRACE_S to tear down (their close() runs at most TEARDOWN_ALONE_S), kills at
  once one that is stopped (nobody is left to continue it), then kills what is left and
  exits.

The plugin cannot signal it where Landlock has ABI 6 (Linux 6.12 on): a zygote's layer
scopes signals to its own domain. On older kernels a setup could stop it (its parent); the
pool child then gives up on it after REPLY_TIMEOUT_S, kills it and starts another, and
the zygotes it guarded are left to the owner records' sweep.

It holds its pool child's pidfd, its request socket and its zygotes' pidfds: not
their control sockets (the pool child sees a zygote's end as its socket's end), not their
output pipes. Removing a killed zygote's home is the owner records' sweep
(pool/sandbox/owners.py), which also covers a guardian killed from outside.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import sys
import time

from .channel import body_of, frame_dict
from .leftovers import (
    PR_SET_CHILD_SUBREAPER,
    TEARDOWN_GRACE_S,
    children,
)
from .libc import open_libc
from .messages import Hello, Launch, Launched, LaunchFailed, Message, ProtocolError, decode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

STOPPED_CHECK_S = 0.2
STRAYS_S = 2.0
"""The longest one round of killing strays lasts; what it could not kill is tried again
every STRAYS_RETRY_S."""
STRAYS_RETRY_S = 1.0
STRAY_CHECK_S = 5.0
"""How often an idle guardian looks for strays anyway: a zygote that cleared its own
subreaper flag hands what its runs orphan to the guardian while it lives."""
ENDED_WAIT_S = 5.0
"""After killing its zygotes, how long the guardian waits for each to be gone (a large
process takes a while to free its memory, and only then are its children re-parented)."""
EXEC_WAIT_S = 5.0
REQUEST_MAX_BYTES = 1 << 16
CONTROL_FD = 3
"""Where a zygote finds its control socket (run.CONTROL_FD)."""
CANNOT_GUARD_EXIT = 3
"""The first process's exit code where no guardian can work (no pidfds: an old kernel, a
container profile; no list of a process's children: a kernel without CONFIG_PROC_CHILDREN)."""
HIGH_FD = 64
"""In a zygote's child before its exec, descriptors are moved above this first, so that
placing them at 0-3 cannot overwrite one another."""


def _readable(fd: int) -> bool:
    waiting = select.poll()
    waiting.register(fd, select.POLLIN)
    return bool(waiting.poll(0))


def _stop_trees(roots: list[int], deadline: float) -> list[int]:
    """SIGSTOP `roots` and every process below them, looking again below each stopped one
    until no new process appears (or the deadline passes); every pid stopped."""
    stopped: list[int] = []
    seen: set[int] = set()
    pending = list(roots)
    while pending and time.monotonic() < deadline:
        for pid in pending:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
            seen.add(pid)
            stopped.append(pid)
        found = [child for pid in pending for child in children(pid)]
        pending = [pid for pid in found if pid not in seen]
    return stopped


def _stopped(pid: int) -> bool:
    """Stopped (SIGSTOP, by its throttle) or traced; False when that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as source:
            return source.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


def spawn(argv: list[str], env: dict[str, str], control: int, out: int, err: int) -> int:
    """Fork and execute one zygote: its own session, /dev/null as 0, `out` and `err` as 1
    and 2, `control` as 3, nothing else. Its pid; OSError if it could not be executed."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
        if pid == 0:
            _exec_child(argv, env, (control, out, err), write_end)
        os.close(write_end)
        write_end = -1
        waiting = select.poll()
        waiting.register(read_end, select.POLLIN)
        if not waiting.poll(EXEC_WAIT_S * 1000):  # stopped or stuck before its exec
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise OSError(errno.ETIMEDOUT, f"{argv[0]} was not executed in time")
        failure = os.read(read_end, 512)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if failure:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        code = int(failure.split(b":", 1)[0] or 0)
        raise OSError(code, f"{os.strerror(code)}: {argv[0]}")
    return pid


def _exec_child(argv: list[str], env: dict[str, str], fds: tuple[int, int, int],
                report: int) -> NoReturn:
    try:
        os.setsid()
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, HIGH_FD) for fd in (*fds, report)]
        control, out, err, report = high
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.dup2(control, CONTROL_FD)
        os.closerange(CONTROL_FD + 1, HIGH_FD)  # the rest above are close-on-exec
        os.execve(argv[0], argv, env)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.write(report, b"%d:" % (exc.errno or 0))
    except BaseException:
        with contextlib.suppress(OSError):
            os.write(report, b"0:")
    os._exit(127)


class Guardian:
    """The guardian's loop: launches, ended zygotes, its pool child's end.

    SIGCHLD keeps its default action: a child that exits stays a zombie until reaped here,
    so its pid names it (or nobody) whenever it is signalled; zygotes are signalled through
    their pidfds all the same."""

    def __init__(self, requests: socket.socket, owner: int) -> None:
        self.requests: socket.socket | None = requests
        self.owner = owner
        self.zygotes: dict[int, int] = {}
        """pid → pidfd of each zygote not yet reaped."""
        self.poller = select.poll()
        self.poller.register(owner, select.POLLIN)
        self.poller.register(requests.fileno(), select.POLLIN)

    def serve(self) -> NoReturn:
        strays_left = False
        while True:
            timeout = STRAYS_RETRY_S if strays_left else STRAY_CHECK_S
            for fd, _events in self.poller.poll(timeout * 1000):
                if fd == self.owner:
                    self.owner_gone()
                if self.requests is not None and fd == self.requests.fileno():
                    self.request()
            self.reap()
            strays_left = not self.kill_strays()
            if self.requests is None and not self.zygotes and not strays_left:
                os._exit(0)  # no launch can come and nothing is left to guard

    def request(self) -> None:
        """One Launch answered. The request socket's end while the pool child lives ends the
        launches, not the guarding: its zygotes still serve their pool child, and are killed
        only when it is gone."""
        assert self.requests is not None
        try:
            data, fds, _flags, _addr = socket.recv_fds(
                self.requests, REQUEST_MAX_BYTES, 3, socket.MSG_CMSG_CLOEXEC)
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            self.poller.unregister(self.requests.fileno())
            self.requests.close()
            self.requests = None
            return
        reply: Message
        ref = 0
        try:
            frame = frame_dict(data)
            given = frame.get("ref")  # answered with its own reference even if refused
            ref = given if type(given) is int else 0
            message = decode(frame)
            if not isinstance(message, Launch) or len(fds) != 3:
                raise ProtocolError("expected a launch with three descriptors")
            argv, env = _checked(message)
            control, out, err = fds
            pid = spawn(argv, env, control, out, err)
            self.watch(pid)
            reply = Launched(ref=ref, pid=pid)
        except Exception as exc:  # a bad request is answered; the guardian goes on
            reply = LaunchFailed(ref=ref, reason=f"{type(exc).__name__}: {exc}"[:500])
        finally:
            for fd in fds:
                os.close(fd)
        with contextlib.suppress(OSError):  # its end is seen at the next poll
            self.requests.send(body_of(reply))

    def watch(self, pid: int) -> None:
        try:
            pidfd = os.pidfd_open(pid)  # a child not reaped yet: its pid is still its own
        except OSError:  # out of descriptors: killed at once rather than unwatched
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            raise
        self.zygotes[pid] = pidfd
        self.poller.register(pidfd, select.POLLIN)

    def reap(self) -> None:
        """Reap every child that has exited, and forget every zygote that has (reaped here,
        or by the kernel, should SIGCHLD be ignored after all)."""
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            self.forget(pid)
        for pid, pidfd in list(self.zygotes.items()):
            if _readable(pidfd):  # exited: reaped above, or already
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                self.forget(pid)

    def forget(self, pid: int) -> None:
        pidfd = self.zygotes.pop(pid, None)
        if pidfd is not None:
            self.poller.unregister(pidfd)
            os.close(pidfd)

    def kill_strays(self) -> bool:
        """Kill every child that is not a zygote, with everything below it: stopped first,
        generation by generation until no new process shows up (a stopped process cannot
        fork, so a chain of forks cannot outrun this), then killed. True once none is left;
        False if some could not be killed within STRAYS_S (tried again later)."""
        deadline = time.monotonic() + STRAYS_S
        while time.monotonic() < deadline:
            strays = self.strays()
            if not strays:
                return True
            frozen = _stop_trees(strays, deadline)
            for pid in frozen:  # SIGKILL ends a stopped process too
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
            self.reap()
        return not self.strays()

    def strays(self) -> list[int]:
        """Children that are not zygotes: what a dead zygote's tree left."""
        return [pid for pid in children() if pid not in self.zygotes]

    def signal_zygotes(self, pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)  # its group (what its setup started): the
            with contextlib.suppress(OSError):  # zygote is not reaped, its pid its own
                signal.pidfd_send_signal(self.zygotes[pid], signal.SIGKILL)

    def await_zygotes(self, seconds: float, *, kill_stopped: bool) -> None:
        """Until every zygote has ended (and been reaped) or `seconds` have passed;
        `kill_stopped`: one found stopped meanwhile is killed at once."""
        deadline = time.monotonic() + seconds
        while self.zygotes and time.monotonic() < deadline:
            waiting = select.poll()
            for pidfd in self.zygotes.values():
                waiting.register(pidfd, select.POLLIN)
            waiting.poll(STOPPED_CHECK_S * 1000)
            self.reap()
            if kill_stopped:
                self.signal_zygotes([pid for pid in self.zygotes if _stopped(pid)])

    def owner_gone(self) -> NoReturn:
        """The pool child is gone: the zygotes' grace, then nothing below is left."""
        try:
            self.await_zygotes(TEARDOWN_GRACE_S, kill_stopped=True)
            self.signal_zygotes(list(self.zygotes))
            self.await_zygotes(ENDED_WAIT_S, kill_stopped=False)
        finally:
            try:
                self.kill_strays()
            finally:
                os._exit(0)


def _checked(message: Launch) -> tuple[list[str], dict[str, str]]:
    """A launch's program and environment, or TypeError: all strings, a program named."""
    argv, env = message.argv, message.env
    if not argv or not all(isinstance(arg, str) and arg and "\0" not in arg for arg in argv):
        raise TypeError("argv must be non-empty strings without NUL")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise TypeError("env must map strings to strings")
    return argv, env


def children_listed() -> bool:
    """The kernel lists a process's children (CONFIG_PROC_CHILDREN): what strays are found by."""
    return os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> NoReturn:
    """`... guardian <request fd>`, started by the pool child (guardians.py): detach (the pool
    child reaps this first process), then serve until the pool child is gone."""
    requests = int(sys.argv[1])
    try:
        owner = os.pidfd_open(os.getppid())  # now: the pool child waits for this process
    except OSError:
        owner = -1
    if owner < 0 or not children_listed():
        # No pidfds, or no list of children (strays could not be found): no guardian
        # here; the pool child starts its zygotes itself (guardians.CANNOT_GUARD_EXIT).
        os._exit(CANNOT_GUARD_EXIT)
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    try:
        libc = open_libc()
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            os._exit(4)  # no Hello: the pool child tries again, then goes without
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # an ignored one would reap for us
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        for name in os.listdir("/proc/self/fd"):
            if int(name) > 2 and int(name) not in (owner, requests):
                with contextlib.suppress(OSError):
                    os.close(int(name))
        sock = socket.socket(fileno=requests)
        sock.set_inheritable(False)
        guardian = Guardian(sock, owner)
        trim = getattr(libc, "malloc_trim", None)  # glibc's
        if trim is not None:
            trim(0)  # what starting the interpreter freed: back to the system
        sock.send(body_of(Hello(pid=os.getpid(), rss_bytes=_rss_bytes())))
    except BaseException:
        os._exit(4)
    guardian.serve()

