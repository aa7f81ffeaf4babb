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

from pluginpool.pool.sandbox import guardians
from pluginpool.pool.sandbox.guardians import RUNTIME_DIR, bootstrap, holds_socket
from pluginpool.pool.sandbox.output import OutputPipes
from pluginpool.pool.sandbox.runtime import channel
from pluginpool.pool.sandbox.runtime.messages import Hello
from pluginpool.pool.sandbox.runtime.run import CONTROL_FD
from pluginpool.tasks.run_logs import LogTail

BOOTSTRAP = bootstrap("zygote")
ZYGOTE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LD_BIND_NOW": "1"}
"""LD_BIND_NOW: the dynamic linker resolves every C-library call the interpreter makes once,
when the zygote starts, instead of at first call; lazily, every run resolved again the calls
only runs make (setsid, close_range, dup3, ...: each run starts from the zygote's memory)
and copied the pages it wrote doing so (bench/sandbox_cost.py: about 15 faults and 0.1 ms
of CPU a run). The zygote drops it from its environment once started (zygote._detach)."""
logger = logging.getLogger("pluginpool.sandbox.launcher")

HELLO_TIMEOUT_S = 30.0
HELLO_MAX_BYTES = 4096


def _await_hello(proc: subprocess.Popen[bytes] | None, ours: socket.socket,
                 output: OutputPipes, early: LogTail) -> None:
    """Until the zygote's Hello is readable and the intermediate process (`proc`, when the
    zygote was not started by a guardian) is reaped, with its pipes read into `early`
    meanwhile (an interpreter writing more than a pipe holds at start would otherwise wait
    for us, and we for its Hello)."""
    control = ours.fileno()
    deadline = time.monotonic() + HELLO_TIMEOUT_S
    poller = select.poll()  # not select(): descriptor numbers may pass 1024
    for fd in (control, *output.fds):
        poller.register(fd, select.POLLIN)
    hello_ready = False
    while not hello_ready or (proc is not None and proc.poll() is None):
        left = deadline - time.monotonic()
        if left <= 0:
            raise ZygoteStartError("the zygote did not say hello in time")
        for fd, _event in poller.poll(min(left, 0.005) * 1000):
            if fd == control:
                hello_ready = True
            elif output.read(fd, early):
                continue
            poller.unregister(fd)  # Hello (or its end) is there; a pipe at its end


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
        argv = [self.interpreter, "-I", *(() if self.site_packages else ("-S",)), "-c",
                BOOTSTRAP, self.runtime_dir]
        proc: subprocess.Popen[bytes] | None = None
        try:
            if not self._launch_guarded(argv, theirs.fileno(), stdout_w, stderr_w):
                proc = subprocess.Popen(
                    [*argv, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                    env=ZYGOTE_ENV, stdin=subprocess.DEVNULL, stdout=stdout_w,
                    stderr=stderr_w, close_fds=True, start_new_session=True)
        except guardians.GuardianNoAnswer as exc:
            ours.close()
            output.close()
            raise ZygoteStartError(str(exc)) from exc
        except OSError as exc:
            ours.close()
            output.close()
            raise ZygoteStartError(f"cannot start {self.interpreter}: {exc}") from exc
        except BaseException:  # interrupted (Celery's soft limit): a zygote the guardian
            ours.close()  # may have started reads the end of its control and exits
            output.close()
            raise
        finally:
            theirs.close()
            os.close(stdout_w)
            os.close(stderr_w)
        early = LogTail(4096)
        try:
            # Started by the pool child itself, the first process forks the zygote and
            # exits, so the zygote is nobody's child in the worker: reap it here.
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
            if proc is not None:
                with contextlib.suppress(OSError):
                    proc.kill()
            raise
        said = early.text()
        if said:  # the interpreter's or its site's, before any plugin code: for operators
            logger.warning("zygote %d wrote at start (its interpreter, not a plugin): %s",
                           hello.pid, said)
        return hello, ours, output

    def _launch_guarded(self, argv: list[str], control: int, stdout: int,
                        stderr: int) -> bool:
        """Start the zygote through this process's guardian (guardians.py); False where
        none can run (the caller starts it itself), or for another copy of the runtime (a
        benchmark's baseline, whose zygote forks away by itself). OSError: the guardian
        could not execute the interpreter; GuardianNoAnswer: it did not answer."""
        if self.runtime_dir != RUNTIME_DIR:
            return False
        for attempt in range(2):  # one that cannot be reached is started again, once
            guardian: guardians.GuardianProcess | None = None
            try:
                guardian = guardians.guardian()
                guardian.launch([*argv, str(CONTROL_FD), "guarded"], ZYGOTE_ENV, control,
                                stdout, stderr)
                return True
            except guardians.CannotGuard:
                return False
            except guardians.GuardianUnavailable as exc:
                guardians.forget(guardian)
                if attempt:
                    logger.warning("starting the zygote without a guardian: %s", exc)
            except guardians.GuardianNoAnswer:
                # Sent: it may yet start the zygote with these descriptors, so no other
                # may be started with them (two zygotes on one control socket).
                guardians.forget(guardian, kill=True)
                raise
        return False
