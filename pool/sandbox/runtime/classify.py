"""Turning what happened inside the sandbox into one typed RunError."""

from __future__ import annotations

import errno
import traceback

from .audit import AuditPolicy
from .messages import RESOURCE, RUNTIME, SECURITY, TIMEOUT, RunError

TRACEBACK_LIMIT_CHARS = 8_000
SOFT_TIME_LIMIT_NAMES = ("SoftTimeLimitExceeded",)


def error_of(exc: BaseException, *, policy: AuditPolicy | None, max_memory_mb: int,
             max_storage_kb: int, timeout_ms: int) -> RunError:
    """The sandbox's verdict wins over the exception the plugin saw (it may have caught it)."""
    if policy is not None and policy.violations:
        first = policy.violations[0]
        return RunError(type=first["type"], message=first["message"], details=first["details"])
    if type(exc).__name__ in SOFT_TIME_LIMIT_NAMES:
        return RunError(TIMEOUT, "run exceeded its time limit",
                        {"limit": "timeout_ms", "limit_value": timeout_ms})
    if isinstance(exc, MemoryError):
        return RunError(RESOURCE, "run ran out of memory",
                        {"limit": "max_memory_mb", "limit_value": max_memory_mb,
                         "restartable": True})
    if isinstance(exc, OSError):
        if exc.errno == errno.EFBIG:
            return RunError(RESOURCE, "a file outgrew the storage quota",
                            {"limit": "max_storage_kb", "limit_value": max_storage_kb})
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            from .limits import MAX_OPEN_FILES
            return RunError(RESOURCE, "too many open files",
                            {"limit": "max_open_files", "limit_value": MAX_OPEN_FILES,
                             "exception_type": type(exc).__name__})
        if exc.errno in (errno.EPERM, errno.EACCES):
            return RunError(SECURITY, f"operation refused by the sandbox: {exc}",
                            {"exception_type": type(exc).__name__, "attempted": str(exc)})
    text = "".join(traceback.format_exception(exc))[-TRACEBACK_LIMIT_CHARS:]
    return RunError(RUNTIME, f"{type(exc).__name__}: {exc}",
                    {"exception_type": type(exc).__name__, "traceback": text})
