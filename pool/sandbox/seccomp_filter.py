"""seccomp, through libseccomp (`pyseccomp`): the kernel refuses what the plugin may not do.

Denials return an errno (the plugin sees an OSError it cannot get around), not a kill, so the
run can still report what was attempted. Threads keep working: only `clone` without
CLONE_THREAD (a new process) is refused, and `clone3`, whose flags a filter cannot read,
returns ENOSYS so that the C library falls back to `clone`.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

CLONE_THREAD = 0x00010000


def _load() -> Any:
    try:
        import pyseccomp
    except (ImportError, OSError):
        return None
    return pyseccomp


def available() -> bool:
    return _load() is not None


def apply(*, allow_processes: bool, allow_network: bool, channel_fd: int) -> dict[str, bool]:
    """Install the filter on this process (and anything it could still start)."""
    sc = _load()
    if sc is None:
        raise OSError(errno.ENOSYS, "libseccomp is not available")
    deny = sc.ERRNO(errno.EPERM)
    rules = sc.SyscallFilter(defaction=sc.ALLOW)
    if not allow_processes:
        for name in ("execve", "execveat", "fork", "vfork"):
            rules.add_rule(deny, name)
        rules.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
        rules.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    if not allow_network:
        for family in (socket.AF_INET, socket.AF_INET6):
            rules.add_rule(sc.ERRNO(errno.EACCES), "socket", sc.Arg(0, sc.EQ, family))
    # The channel that carries the result back cannot be closed or replaced.
    rules.add_rule(deny, "close", sc.Arg(0, sc.EQ, channel_fd))
    # close_range would take the channel with it; ENOSYS makes Python fall back to close().
    rules.add_rule(sc.ERRNO(errno.ENOSYS), "close_range")
    rules.add_rule(deny, "dup2", sc.Arg(1, sc.EQ, channel_fd))
    rules.add_rule(deny, "dup3", sc.Arg(1, sc.EQ, channel_fd))
    rules.load()
    return {"processes": not allow_processes, "network": not allow_network}
