"""seccomp, through libseccomp (`pyseccomp`): the kernel refuses what the plugin may not do.

Denials return an errno (the plugin sees an OSError it cannot get around), not a kill, so the
run can still report what was attempted. Threads keep working: only `clone` without
CLONE_THREAD (a new process) is refused, and `clone3`, whose flags a filter cannot read,
returns ENOSYS so that the C library falls back to `clone`.

Compiling a filter with libseccomp costs about a millisecond, so the pool child compiles
each variant once, to BPF, and the zygote and the run only load the bytes (one prctl,
runtime/seccomp.py).
"""

from __future__ import annotations

import errno
import functools
import os
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


@functools.lru_cache(maxsize=32)
def compile_filter(*, allow_processes: bool, allow_network: bool, channel_fd: int | None,
                   allow_fork: bool | None = None) -> bytes:
    """The BPF program for one combination of permissions (compiled in the pool child).

    A zygote's filter (`channel_fd=None`, `allow_fork=True`) denies exec and sockets but
    lets it fork its runs; a run's filter stacks on it and also denies forking (unless
    `allow_processes`) and closing its channel."""
    sc = _load()
    if sc is None:
        raise OSError(errno.ENOSYS, "libseccomp is not available")
    deny = sc.ERRNO(errno.EPERM)
    rules = sc.SyscallFilter(defaction=sc.ALLOW)
    fork_allowed = allow_processes if allow_fork is None else allow_fork
    if not allow_processes:
        for name in ("execve", "execveat"):
            rules.add_rule(deny, name)
    if not fork_allowed:
        for name in ("fork", "vfork"):
            rules.add_rule(deny, name)
        rules.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
        rules.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    if not allow_network:
        for family in (socket.AF_INET, socket.AF_INET6):
            rules.add_rule(sc.ERRNO(errno.EACCES), "socket", sc.Arg(0, sc.EQ, family))
    if channel_fd is not None:
        # The channel that carries the result back cannot be closed or replaced.
        rules.add_rule(deny, "close", sc.Arg(0, sc.EQ, channel_fd))
        # close_range would take the channel with it; ENOSYS makes Python fall back to close().
        rules.add_rule(sc.ERRNO(errno.ENOSYS), "close_range")
        rules.add_rule(deny, "dup2", sc.Arg(1, sc.EQ, channel_fd))
        rules.add_rule(deny, "dup3", sc.Arg(1, sc.EQ, channel_fd))
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(write_end, "wb", closefd=True) as sink:
            rules.export_bpf(sink)
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
    finally:
        os.close(read_end)
    return b"".join(chunks)
