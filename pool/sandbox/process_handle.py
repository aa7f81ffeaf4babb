"""A sandbox process the pool child may signal, held by a pidfd.

The pool child learns a run's pid from its zygote (Forked), and a zygote runs plugin code:
a setup can make it name any pid, 0 (the pool child's own process group) included. So a
pid is taken only if it is plausible (above 1, not the pool child) and, for a run, a child
of its zygote; and every signal to the process goes through a pidfd opened when the pid
was checked, so a process that has ended and whose pid was reused is never hit. Its process
group is signalled (killpg) only through such a handle: while the leader lives, or once it
is gone and no process has its pid (the group is then the leader's orphaned one). A pid
that was already gone when it was named is never signalled, nor its group.
"""

from __future__ import annotations

import contextlib
import os
import signal


class UnverifiedProcess(Exception):
    """A pid the pool child will not signal: not a child of the sandbox's zygote, or one
    that can never be a sandbox's (0, 1, the pool child itself)."""


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (state first, then the parent,
    ...: proc(5) numbering minus 3); None when the process is gone. Read with os-level
    calls: a buffered file object costs several times more, and this runs every run."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.read(fd, 4096).rsplit(b")", 1)[1].split()
        finally:
            os.close(fd)
    except (OSError, IndexError):
        return None


def parent_of(pid: int) -> int | None:
    """The parent pid; None when the process is gone."""
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


class ProcessHandle:
    """One sandbox process: its pid, and a pidfd while it could be opened."""

    __slots__ = ("_pidfd", "pid")

    def __init__(self, pid: int, pidfd: int | None) -> None:
        self.pid = pid
        self._pidfd = pidfd

    @classmethod
    def open(cls, pid: int, *, parent: int | None = None) -> ProcessHandle:
        """A handle on `pid`, checked: UnverifiedProcess if it cannot be a sandbox process,
        or (with `parent`) is alive but not `parent`'s child. A process already gone (a
        fast run its zygote has reaped) gives a handle that signals nothing."""
        if pid <= 1 or pid == os.getpid():
            raise UnverifiedProcess(f"pid {pid} cannot be a sandbox's")
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return cls(pid, None)
        handle = cls(pid, pidfd)
        if parent is not None:
            found = parent_of(pid)
            if not handle.alive():  # gone since the pidfd was opened: /proc was not its
                handle.close()
                return cls(pid, None)
            if found != parent:
                handle.close()
                raise UnverifiedProcess(f"pid {pid} is not a child of {parent}")
        return handle

    def fileno(self) -> int | None:
        """The pidfd (readable once the process has ended), or None."""
        return self._pidfd

    def alive(self) -> bool:
        """The process has not been reaped (a zombie is alive here)."""
        if self._pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(self._pidfd, 0)
        except (ProcessLookupError, OSError):
            return False
        return True

    def send(self, signum: int) -> None:
        """Signal the process itself, if it is still the one checked."""
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                signal.pidfd_send_signal(self._pidfd, signum)

    def send_group(self, signum: int) -> None:
        """Signal the process group it leads (a zygote, a run once it has called setsid),
        only through a checked handle: while the leader lives (its pid is then its own),
        or once it is gone if no process has its pid (a group of that id is then the
        leader's own, orphaned: what it started lives on there, and the kernel gives no
        new process a pid that is a living group's id). A pid that another process has
        taken since is not signalled; nor the pool child's own group."""
        if self._pidfd is None or self.pid == os.getpgrp():
            return
        if not self.alive() and os.path.exists(f"/proc/{self.pid}"):
            return  # its pid is someone else's now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def close(self) -> None:
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(pidfd)
