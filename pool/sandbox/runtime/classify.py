"""Turning what happened inside the sandbox into one typed RunError."""

from __future__ import annotations

import errno
import traceback

from .audit import AuditPolicy
from .messages import RESOURCE, RUNTIME, SECURITY, TIMEOUT, RunError

TRACEBACK_LIMIT_CHARS = 8_000
MESSAGE_LIMIT_CHARS = 4_096
"""An exception's text kept in a message (policy.errors.MAX_ERROR_MESSAGE_CHARS): a plugin's
5 MB message would otherwise outgrow the result frame's bound (the run is then reported as
an oversized result) or the setup report's (the setup as a died sandbox)."""
SOFT_TIME_LIMIT_NAMES = ("SoftTimeLimitExceeded",)


def describe(exc: BaseException) -> str:
    """`Type: text` of a plugin's exception, bounded; its __str__ may raise anything (a
    failed description must not turn a typed error into a dead process, run again)."""
    try:
        text = str(exc)
    except BaseException:  # plugin code: SystemExit, KeyboardInterrupt too
        text = "<the exception's str() raised>"
    if not isinstance(text, str):  # a str subclass whose methods misbehave
        text = "<the exception's str() is not text>"
    if len(text) > MESSAGE_LIMIT_CHARS:
        text = f"{text[:MESSAGE_LIMIT_CHARS]}...[truncated {len(text) - MESSAGE_LIMIT_CHARS} chars]"
    return f"{type(exc).__name__}: {text}"


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
            attempted = describe(exc).split(": ", 1)[1]
            return RunError(SECURITY, f"operation refused by the sandbox: {attempted}",
                            {"exception_type": type(exc).__name__, "attempted": attempted})
    try:
        text = "".join(traceback.format_exception(exc))[-TRACEBACK_LIMIT_CHARS:]
    except BaseException:  # a traceback of plugin objects may raise too
        text = ""
    return RunError(RUNTIME, describe(exc),
                    {"exception_type": type(exc).__name__, "traceback": text})
