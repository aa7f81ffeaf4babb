"""The process's own C library, opened the one way the runtime opens it.

`CDLL(None)`, not `ctypes.util.find_library`, which would import subprocess, tempfile
and random into every zygote (and random's fork handler costs every run). Each module
gets a handle of its own: the argument and result types it declares on a function stay
its own (a shared handle let one module's `argtypes` break another's calls).
"""

from __future__ import annotations

import ctypes


def open_libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc
