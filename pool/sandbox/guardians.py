"""This pool process's zygote guardian (runtime/guardian.py): started the first time the
process starts a zygote, again if it has died since; zygotes are launched through it, so
that it is their parent and kills what they leave, and kills them when this process dies.

Where no guardian can work (a kernel that does not list a process's children: no
CONFIG_PROC_CHILDREN) the launcher starts zygotes itself, as before guardians existed;
the owner records' sweep (owners.py) covers them then. pidfds (Linux 5.3 on, pidfd_open
allowed) are required by warm sandboxes whatever the guardian (warm.py watches each
zygote through one).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from pluginpool.pool.sandbox.process_handle import stat_fields
from pluginpool.pool.sandbox.runtime import channel
from pluginpool.pool.sandbox.runtime.guardian import CANNOT_GUARD_EXIT
from pluginpool.pool.sandbox.runtime.messages import (
    Hello,
    Launch,
    Launched,
    LaunchFailed,
    decode,
)

logger = logging.getLogger("pluginpool.sandbox.guardians")

RUNTIME_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime")
RUNTIME_MODULE = "pluginpool_sandbox_runtime"
START_TIMEOUT_S = 30.0
REPLY_TIMEOUT_S = 10.0
"""A guardian forks and executes at once: one that takes this long is stopped or stuck."""
REPLY_MAX_BYTES = 4096
GUARDIAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def bootstrap(module: str) -> str:
    """`python -c` code that loads the sandbox runtime from the directory in argv[1] by path
    (under its own name: nothing of pluginpool needs to be importable) and runs
    `<module>.main()` with the arguments after it."""
    return (
        "import importlib.util as u, sys\n"
        "d = sys.argv[1]\n"
        f"s = u.spec_from_file_location({RUNTIME_MODULE!r}, d + '/__init__.py',"
        " submodule_search_locations=[d])\n"
        "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m)\n"
        f"from {RUNTIME_MODULE}.{module} import main\n"
        "sys.argv = sys.argv[1:]\n"
        "main()\n"
    )


def holds_socket(pid: int, fd: int, inode: int) -> bool:
    """Whether process `pid` has socket `inode` as its descriptor `fd`: a zygote's or a
    guardian's Hello names its own pid, which the pool child signals from then on, so it
    must be the process at the other end of the socket (checked before any plugin code
    runs, while its /proc entries are still readable), never 0, 1 or the pool child."""
    if pid <= 1 or pid == os.getpid():
        return False
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]"
    except OSError:
        return False


class GuardianUnavailable(OSError):
    """No guardian could be started or reached before the launch was sent: the launcher may
    try another, or start the zygote itself."""


class GuardianNoAnswer(OSError):
    """The launch was sent and no answer came: the zygote may have been started with the
    descriptors sent, so nothing else may be started with them."""


@dataclass
class GuardianProcess:
    """The pool child's end of its guardian's request socket."""

    pid: int
    sock: socket.socket
    pidfd: int
    refs: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    lock: threading.Lock = field(default_factory=threading.Lock)
    """One launch at a time (a pool of threads shares this process's guardian)."""

    def alive(self) -> bool:
        """Running, and not stopped (a stopped one would take a launch and never answer;
        nothing has been sent to it yet, so another may be started in its place)."""
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        if poller.poll(0):
            return False
        fields = stat_fields(self.pid)  # unreadable now: the launch's timeout still bounds it
        return fields is None or fields[0] not in (b"T", b"t")

    def launch(self, argv: list[str], env: dict[str, str], control: int, stdout: int,
               stderr: int) -> int:
        """Start a zygote (argv is executed as is; it finds its control socket as fd 3):
        its pid. GuardianUnavailable if the request could not be sent, GuardianNoAnswer if
        no answer came in REPLY_TIMEOUT_S; OSError with the guardian's reason if the
        program could not be executed."""
        with self.lock:
            ref = next(self.refs)
            data = channel.body_of(Launch(ref=ref, argv=argv, env=env))
            try:
                socket.send_fds(self.sock, [data], [control, stdout, stderr])
            except OSError as exc:
                raise GuardianUnavailable(f"guardian {self.pid}: {exc}") from exc
            try:
                while True:  # answers to launches given up on before are skipped
                    message = _decode_reply(channel.frame_dict(self.sock.recv(REPLY_MAX_BYTES)))
                    if message.ref == ref:
                        break
            except (OSError, ValueError) as exc:
                raise GuardianNoAnswer(f"guardian {self.pid} did not answer: {exc}") from exc
        if isinstance(message, LaunchFailed):
            raise OSError(message.reason)
        return message.pid

    def close(self, *, kill: bool = False) -> None:
        """Let it go; `kill`: one that did not answer (stopped, stuck) is killed, not left
        to wait for ever (its zygotes go on; the owner records' sweep covers them)."""
        pidfd, self.pidfd = self.pidfd, -1  # once: a number closed may be reused
        if pidfd < 0:
            return
        if kill:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        self.sock.close()
        with contextlib.suppress(OSError):
            os.close(pidfd)


def _decode_reply(frame: dict[str, object]) -> Launched | LaunchFailed:
    message = decode(frame)
    if not isinstance(message, Launched | LaunchFailed):
        raise ValueError(f"the guardian answered {message.op!r}")
    return message


_ours: dict[int, GuardianProcess] = {}
"""This process's guardian, by pid (a forked copy of this process has none)."""
_impossible: set[int] = set()
"""Processes where no guardian can work (CannotGuard): not tried again."""
_failed: dict[int, tuple[int, float]] = {}
"""Per process: guardian starts that failed in a row, and when to try again."""
FAILURES_BEFORE_BACKOFF = 3
BACKOFF_S = 600.0


def guardian() -> GuardianProcess:
    """This process's guardian, started if it has none or it has died. After
    FAILURES_BEFORE_BACKOFF failed starts in a row none is tried for BACKOFF_S (each try
    costs an interpreter's start), CannotGuard meanwhile."""
    me = os.getpid()
    if me in _impossible:
        raise CannotGuard("no guardian can work here")
    found = _ours.get(me)
    if found is not None and found.alive():
        return found
    if found is not None:
        found.close(kill=True)  # dead, or stopped: killed
        del _ours[me]
    failures, retry_at = _failed.get(me, (0, 0.0))
    if failures >= FAILURES_BEFORE_BACKOFF and time.monotonic() < retry_at:
        raise CannotGuard(f"{failures} guardian starts failed in a row; trying again later")
    started: GuardianProcess | None = None
    try:
        started = start()
        _ours[me] = started
    except CannotGuard:
        _impossible.add(me)
        raise
    except GuardianUnavailable:
        _failed[me] = (failures + 1, time.monotonic() + BACKOFF_S)
        raise
    except BaseException:  # interrupted before it was kept: not left running unowned
        if started is not None and _ours.get(me) is not started:
            started.close(kill=True)
        raise
    _failed.pop(me, None)
    return started


def forget(which: GuardianProcess | None = None, *, kill: bool = False) -> None:
    """Drop this process's guardian (`which`, if still the current one: it could not be
    reached, or did not answer: `kill`); the next launch starts another."""
    found = _ours.get(os.getpid())
    if found is None or (which is not None and found is not which):
        return
    del _ours[os.getpid()]
    found.close(kill=kill)


class CannotGuard(GuardianUnavailable):
    """No guardian can work here (runtime/guardian.py's CANNOT_GUARD_EXIT: not tried again
    in this process), or none is tried now (after failed starts): the launcher starts the
    zygote itself, quietly."""


def start(interpreter: str = sys.executable) -> GuardianProcess:
    """Start a guardian for this process (GuardianUnavailable if it cannot run here)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    made: GuardianProcess | None = None
    try:
        inode = os.fstat(theirs.fileno()).st_ino
        try:
            proc = subprocess.Popen(
                [interpreter, "-I", "-S", "-c", bootstrap("guardian"), RUNTIME_DIR,
                 str(theirs.fileno())],
                pass_fds=[theirs.fileno()], env=GUARDIAN_ENV, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                start_new_session=True)
        finally:
            theirs_fd = theirs.fileno()
            theirs.close()
        try:  # the first process forks the guardian and exits
            code = proc.wait(START_TIMEOUT_S)
        except BaseException:  # too slow, or interrupted (Celery's soft limit)
            proc.kill()
            proc.wait()
            raise
        if code == CANNOT_GUARD_EXIT:
            raise CannotGuard("no pidfds, or no list of children, here")
        if code != 0:
            raise GuardianUnavailable(f"the guardian's start exited with {code}")
        ours.settimeout(START_TIMEOUT_S)
        hello = channel.frame_dict(ours.recv(REPLY_MAX_BYTES))
        message = decode(hello)
        if not isinstance(message, Hello):
            raise GuardianUnavailable(f"the guardian said {message.op!r} first")
        if not holds_socket(message.pid, theirs_fd, inode):
            raise GuardianUnavailable(f"the guardian named pid {message.pid}, a process "
                                      "that does not hold its socket")
        made = GuardianProcess(pid=message.pid, sock=ours, pidfd=os.pidfd_open(message.pid))
        ours.settimeout(REPLY_TIMEOUT_S)
        logger.info("zygote guardian %d started for pool process %d", made.pid, os.getpid())
        return made
    except GuardianUnavailable:
        _drop(ours, made)
        raise
    except subprocess.TimeoutExpired:
        _drop(ours, made)
        raise GuardianUnavailable("the guardian did not start in time") from None
    except (OSError, ValueError) as exc:
        _drop(ours, made)
        raise GuardianUnavailable(f"the guardian did not start: {exc!r}") from exc
    except BaseException:  # interrupted (Celery's soft limit): nothing of it is kept; a
        _drop(ours, made)  # guardian already started reads the end of its socket and exits
        raise


def _drop(ours: socket.socket, made: GuardianProcess | None) -> None:
    if made is not None:
        made.close(kill=True)
    else:
        ours.close()
