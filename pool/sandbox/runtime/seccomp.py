"""Loading a seccomp filter compiled by the worker (seccomp_filter.py): one prctl.

Standard library only: the zygote and its runs load BPF bytes they were handed; they
never need libseccomp. Filters stack: a run's filter adds to its zygote's.
"""

from __future__ import annotations

import ctypes
import os

from .libc import open_libc

_libc = open_libc()

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
BPF_INSTRUCTION_BYTES = 8


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]




class Prepared:
    """A filter ready to load: its buffer and program structure built once (in the zygote,
    for every run), so loading is two prctl calls."""

    def __init__(self, program: bytes) -> None:
        self.buffer = ctypes.create_string_buffer(program, len(program))
        self.prog = _SockFprog(len(program) // BPF_INSTRUCTION_BYTES,
                               ctypes.addressof(self.buffer))
        self.pointer = ctypes.pointer(self.prog)

    def load(self, *, no_new_privs_set: bool = False) -> None:
        """Install the filter on this process (irrevocable); one call fewer where
        no_new_privs is already set (a run: its zygote set it)."""
        if (not no_new_privs_set and _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) or \
                _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self.pointer, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"seccomp: {os.strerror(err)}")


def set_no_new_privs() -> None:
    """No privilege gain through exec, for this process and its children (irrevocable)."""
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"no_new_privs: {os.strerror(err)}")


def load(program: bytes) -> None:
    """Install a compiled filter on this process (irrevocable)."""
    Prepared(program).load()
