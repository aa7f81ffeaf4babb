"""Starting a zygote: a fresh interpreter running the stdlib-only sandbox runtime.

The caller names the interpreter and the code paths, so a plugin revision can bring its
own environment (another virtualenv, another version of any library): the zygote loads
the runtime package by path, not from the interpreter's site-packages, and pluginpool
itself need not be installed there. It starts with an empty environment (`-I`: no
PYTHON* variables, no user site, no current directory on sys.path) and holds nothing of
the worker's: no settings, no Redis connection, no Celery. A plugin revision with its own
environment starts without site-packages too (`-S`): it sees the standard library, its
code and its environment, nothing installed in the worker's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from pluginpool.pool.sandbox.output import OutputPipes
from pluginpool.pool.sandbox.runtime import channel
from pluginpool.pool.sandbox.runtime.messages import Hello
from pluginpool.pool.sandbox.runtime.run import CONTROL_FD
from pluginpool.tasks.run_logs import LogTail

RUNTIME_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime")
RUNTIME_MODULE = "pluginpool_sandbox_runtime"
BOOTSTRAP = (
    "import importlib.util as u, sys\n"
    "d = sys.argv[1]\n"
    f"s = u.spec_from_file_location({RUNTIME_MODULE!r}, d + '/__init__.py',"
    " submodule_search_locations=[d])\n"
    "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m)\n"
    f"from {RUNTIME_MODULE}.zygote import main\n"
    "sys.argv = sys.argv[1:]\n"
    "main()\n"
)
ZYGOTE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LD_BIND_NOW": "1"}
"""LD_BIND_NOW: the dynamic linker resolves every C-library call the interpreter makes once,
when the zygote starts, instead of at first call; lazily, every run resolved again the calls
only runs make (setsid, close_range, dup3, ...: each run starts from the zygote's memory)
and copied the pages it wrote doing so (bench/sandbox_cost.py: about 15 faults and 0.1 ms
of CPU a run). The zygote drops it from its environment once started (zygote._detach)."""
logger = logging.getLogger("pluginpool.sandbox.launcher")

HELLO_TIMEOUT_S = 30.0
HELLO_MAX_BYTES = 4096


def _await_hello(proc: subprocess.Popen[bytes], ours: socket.socket, output: OutputPipes,
                 early: LogTail) -> None:
    """Until the zygote's Hello is readable and the intermediate process is reaped, with
    its pipes read into `early` meanwhile (an interpreter writing more than a pipe holds at
    start would otherwise wait for us, and we for its Hello)."""
    control = ours.fileno()
    deadline = time.monotonic() + HELLO_TIMEOUT_S
    poller = select.poll()  # not select(): descriptor numbers may pass 1024
    for fd in (control, *output.fds):
        poller.register(fd, select.POLLIN)
    hello_ready = False
    while not hello_ready or proc.poll() is None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ZygoteStartError("the zygote did not say hello in time")
        for fd, _event in poller.poll(min(left, 0.005) * 1000):
            if fd == control:
                hello_ready = True
            elif output.read(fd, early):
                continue
            poller.unregister(fd)  # Hello (or its end) is there; a pipe at its end


def holds_socket(pid: int, fd: int, inode: int) -> bool:
    """Whether process `pid` has socket `inode` as its descriptor `fd`: a zygote's Hello
    names its own pid, which the pool child signals from then on, so it must be the
    process at the other end of the control socket (checked before any plugin code runs,
    while the zygote's /proc entries are still readable), never 0, 1 or the pool child."""
    if pid <= 1 or pid == os.getpid():
        return False
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]"
    except OSError:
        return False


class ZygoteStartError(RuntimeError):
    """The interpreter did not come up as a zygote (bad interpreter path, crash)."""


@dataclass(frozen=True)
class ZygoteLauncher:
    """Which interpreter a zygote runs and which code paths go on its sys.path."""

    interpreter: str = sys.executable
    code_paths: tuple[str, ...] = field(default_factory=tuple)
    site_packages: bool = True
    """False: start without the interpreter's site-packages (`-S`), so the zygote imports
    only the standard library and its code paths (a plugin revision's own environment)."""
    runtime_dir: str = RUNTIME_DIR
    """The sandbox runtime the zygote runs (another copy only in benchmarks' A/B)."""

    def start(self) -> tuple[Hello, socket.socket, OutputPipes]:
        """Start a zygote; returns its Hello (pid, bare size), the control socket and the
        pipes its descriptors 1 and 2 write to (output.py)."""
        ours, theirs = socket.socketpair()
        control_inode = os.fstat(theirs.fileno()).st_ino
        try:
            output, (stdout_w, stderr_w) = OutputPipes.create()
        except OSError as exc:  # out of descriptors
            ours.close()
            theirs.close()
            raise ZygoteStartError(f"cannot make the zygote's pipes: {exc}") from exc
        try:
            proc = subprocess.Popen(
                [self.interpreter, "-I", *(() if self.site_packages else ("-S",)), "-c",
                 BOOTSTRAP, self.runtime_dir, str(theirs.fileno())],
                pass_fds=[theirs.fileno()], env=ZYGOTE_ENV, stdin=subprocess.DEVNULL,
                stdout=stdout_w, stderr=stderr_w, close_fds=True, start_new_session=True)
        except OSError as exc:
            ours.close()
            output.close()
            raise ZygoteStartError(f"cannot start {self.interpreter}: {exc}") from exc
        finally:
            theirs.close()
            os.close(stdout_w)
            os.close(stderr_w)
        early = LogTail(4096)
        try:
            # The first process forks the zygote and exits, so the zygote is nobody's
            # child in the worker: reap the intermediate here.
            _await_hello(proc, ours, output, early)
            hello = channel.receive_message(ours.fileno(), max_bytes=HELLO_MAX_BYTES)
            if not isinstance(hello, Hello):
                raise ZygoteStartError(f"the zygote said {hello.op!r} first")
            if not holds_socket(hello.pid, CONTROL_FD, control_inode):
                raise ZygoteStartError(f"the zygote named pid {hello.pid}, a process that "
                                       "does not hold its control socket")
        except (ZygoteStartError, subprocess.TimeoutExpired, channel.ChannelClosed, OSError,
                ValueError) as exc:
            ours.close()
            output.drain(early)  # the interpreter's own error, if it wrote one
            said = early.text()
            output.close()
            reason = str(exc) if isinstance(exc, ZygoteStartError) else \
                f"the zygote did not start: {exc!r}"
            raise ZygoteStartError(reason + (f"; it wrote:\n{said}" if said else "")) from exc
        except BaseException:  # interrupted (Celery's soft limit): nothing of it is kept; a
            ours.close()  # zygote already forked reads the end of its control and exits
            output.close()
            with contextlib.suppress(OSError):
                proc.kill()
            raise
        said = early.text()
        if said:  # the interpreter's or its site's, before any plugin code: for operators
            logger.warning("zygote %d wrote at start (its interpreter, not a plugin): %s",
                           hello.pid, said)
        return hello, ours, output
