"""Landlock, applied by the zygote and by each run to itself (unprivileged, irrevocable;
each call adds a layer that can only narrow what the layers before it allow).

Written with ctypes because the PyPI binding (`landlock` 1.0.0.dev5) only knows filesystem
rules; pluginpool also needs TCP connect rules (ABI 4) and signal scoping (ABI 6), which
stops a plugin from signalling the worker that supervises it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable

from .libc import open_libc

_libc = open_libc()

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2
PR_SET_NO_NEW_PRIVS = 38

# Filesystem access rights, by the ABI that introduced them.
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
FS_MAKE_SYM, FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 12, 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

FS_READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
FS_ALL_V1 = (1 << 13) - 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPort(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]




def abi_version() -> int:
    """The kernel's Landlock ABI, 0 when Landlock is absent or disabled."""
    result = _libc.syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                           ctypes.c_uint32(CREATE_RULESET_VERSION))
    return max(int(result), 0)


def _fs_rights(abi: int) -> int:
    rights = FS_ALL_V1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock {what}: {os.strerror(err)}")
    return result


def restrict_self(*, read_paths: Iterable[str] | None, write_paths: Iterable[str],
                  tcp_ports: Iterable[int] | None, abi: int) -> dict[str, object]:
    """Allow only these paths and TCP ports (None: do not restrict the network).

    `read_paths=None` adds a layer that restricts writes only: a run's layer on top of its
    zygote's, which already bounds what may be read (two rules instead of dozens)."""
    fd, info = build_ruleset(read_paths=read_paths, write_paths=write_paths,
                             tcp_ports=tcp_ports, abi=abi)
    try:
        enforce(fd)
    finally:
        os.close(fd)
    return info


def build_ruleset(*, read_paths: Iterable[str] | None, write_paths: Iterable[str],
                  tcp_ports: Iterable[int] | None, abi: int) -> tuple[int, dict[str, object]]:
    """The ruleset, not yet enforced: a zygote builds a run's before forking it, so the run
    itself only enforces it (fewer pages of the zygote touched, and copied, in the run)."""
    handled_fs = _fs_rights(abi)
    if read_paths is None:
        handled_fs &= ~FS_READ
        read_paths = ()
    handled_net = NET_CONNECT_TCP | NET_BIND_TCP if abi >= 4 and tcp_ports is not None else 0
    scoped = SCOPE_SIGNAL | SCOPE_ABSTRACT_UNIX_SOCKET if abi >= 6 else 0
    attr = _RulesetAttr(handled_fs, handled_net, scoped)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    fd = _check(_libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                              ctypes.c_uint32(0)), "create_ruleset")
    try:
        for paths, rights in ((read_paths, FS_READ), (write_paths, handled_fs)):
            for path in paths:
                _add_path(fd, path, rights & handled_fs)
        for port in tcp_ports or () if handled_net else ():
            rule = _NetPort(NET_CONNECT_TCP, port)
            _check(_libc.syscall(SYS_ADD_RULE, fd, RULE_NET_PORT, ctypes.byref(rule), 0),
                   "add_rule(net)")
    except BaseException:
        os.close(fd)
        raise
    return fd, {"abi": abi, "network": bool(handled_net), "signals": bool(scoped)}


def enforce(ruleset_fd: int) -> None:
    """Restrict this process (and its future children) by the ruleset (irrevocable)."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    restrict(ruleset_fd)


def restrict(ruleset_fd: int) -> None:
    """enforce() in a process whose no_new_privs is already set (a run: its zygote set
    it), one system call."""
    _check(_libc.syscall(SYS_RESTRICT_SELF, ruleset_fd, 0), "restrict_self")


def _add_path(ruleset_fd: int, path: str, rights: int) -> None:
    try:
        path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # a path that does not exist needs no rule
    try:
        if not os.path.isdir(path):
            rights &= FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
        rule = _PathBeneath(rights, path_fd)
        _check(_libc.syscall(SYS_ADD_RULE, ruleset_fd, RULE_PATH_BENEATH, ctypes.byref(rule), 0),
               f"add_rule({path})")
    finally:
        os.close(path_fd)
