"""Turning what happened inside the sandbox into one typed RunError."""

from __future__ import annotations

import errno
import traceback

from .audit import AuditPolicy
from .messages import RESOURCE, RUNTIME, SECURITY, TIMEOUT, RunError

TRACEBACK_LIMIT_CHARS = 8_000
MESSAGE_LIMIT_CHARS = 4_096
"""A message's length, its type's name included (policy.errors.MAX_ERROR_MESSAGE_CHARS,
tested equal): a plugin's 5 MB message would otherwise outgrow the result frame's bound
(the run then reported as an oversized result) or the setup report's (a died sandbox)."""
NAME_LIMIT_CHARS = 200
"""An exception class's name kept: a class can be made with a 2 MB name."""
TRUNCATION_MARKER = "...[truncated {} chars]..."
"""As policy.errors.TRUNCATION_MARKER (tested equal)."""
SOFT_TIME_LIMIT_NAMES = ("SoftTimeLimitExceeded",)


def bounded(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, marker included (policy.errors.truncate_text,
    which the runtime cannot import)."""
    if len(text) <= limit:
        return text
    room = max(limit - len(TRUNCATION_MARKER.format(len(text))), 0)
    return text[:room] + TRUNCATION_MARKER.format(len(text) - room)


def type_name(exc: BaseException) -> str:
    """The exception's class name, read past any metaclass (whose `__name__` may be a
    property that raises) and bounded."""
    try:
        name = str.__str__(type.__dict__["__name__"].__get__(type(exc)))
    except BaseException:  # plugin code: anything, SystemExit and KeyboardInterrupt too
        name = "<unnamed exception>"
    return bounded(name, NAME_LIMIT_CHARS)


def describe(exc: BaseException) -> str:
    """`Type: text` of a plugin's exception, at most MESSAGE_LIMIT_CHARS. Its __str__ may
    raise anything or return a str subclass whose methods do (copied to a plain str
    first): a description that fails turned a typed error into a dead process, run again."""
    name = type_name(exc)
    try:
        text = str.__str__(str(exc))
    except BaseException:  # plugin code: anything, SystemExit and KeyboardInterrupt too
        text = "<the exception's str() raised>"
    return f"{name}: {bounded(text, max(MESSAGE_LIMIT_CHARS - len(name) - 2, 0))}"


def error_of(exc: BaseException, *, policy: AuditPolicy | None, max_memory_mb: int,
             max_storage_kb: int, timeout_ms: int) -> RunError:
    """The sandbox's verdict wins over the exception the plugin saw (it may have caught it).
    Never raises: plugin objects are read past their overrides (`type()`, not `__class__`;
    OSError's own `errno`), and whatever still raises gives a fixed error."""
    try:
        return _error_of(exc, policy=policy, max_memory_mb=max_memory_mb,
                         max_storage_kb=max_storage_kb, timeout_ms=timeout_ms)
    except BaseException:  # plugin code: anything
        return RunError(RUNTIME, "the plugin raised an exception that could not be described",
                        {"exception_type": "<undescribable>"})


def _error_of(exc: BaseException, *, policy: AuditPolicy | None, max_memory_mb: int,
              max_storage_kb: int, timeout_ms: int) -> RunError:
    if policy is not None and policy.violations:
        first = policy.violations[0]
        return RunError(type=first["type"], message=first["message"], details=first["details"])
    kind, name = type(exc), type_name(exc)
    if name in SOFT_TIME_LIMIT_NAMES:
        return RunError(TIMEOUT, "run exceeded its time limit",
                        {"limit": "timeout_ms", "limit_value": timeout_ms})
    if issubclass(kind, MemoryError):
        return RunError(RESOURCE, "run ran out of memory",
                        {"limit": "max_memory_mb", "limit_value": max_memory_mb,
                         "restartable": True})
    if issubclass(kind, OSError):
        code = OSError.__dict__["errno"].__get__(exc)  # not a subclass's override
        if code == errno.EFBIG:
            return RunError(RESOURCE, "a file outgrew the storage quota",
                            {"limit": "max_storage_kb", "limit_value": max_storage_kb})
        if code in (errno.EMFILE, errno.ENFILE):
            from .limits import MAX_OPEN_FILES
            return RunError(RESOURCE, "too many open files",
                            {"limit": "max_open_files", "limit_value": MAX_OPEN_FILES,
                             "exception_type": name})
        if code in (errno.EPERM, errno.EACCES):
            attempted = describe(exc)[len(name) + 2:]
            return RunError(SECURITY, f"operation refused by the sandbox: {attempted}",
                            {"exception_type": name, "attempted": attempted})
    return RunError(RUNTIME, describe(exc),
                    {"exception_type": name, "traceback": traceback_text(exc)})


def traceback_text(exc: BaseException) -> str:
    """The end of its formatted traceback, or "" if formatting it raised (plugin objects,
    `__notes__`, may raise anything)."""
    try:
        return "".join(traceback.format_exception(exc))[-TRACEBACK_LIMIT_CHARS:]
    except BaseException:  # plugin code: anything
        return ""
