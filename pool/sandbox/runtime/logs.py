"""A run's (and a setup's) stdout, stderr and `ctx.logger`, sent to the supervisor as Log
frames.

Standard library only (imported in the zygote). The three streams share one buffer, so
their lines arrive in the order they were written; it is sent every CHUNK_CHARS, on a
line once FLUSH_S has passed, when a stream is flushed, and before the Result. The cap
is the supervisor's (tasks/run_logs.py), not this module's: a plugin that writes around
these objects only reaches the same channel, or /dev/null.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import select
import sys
import time

from . import channel
from .libc import open_libc
from .messages import Log

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from typing import Any

_libc = open_libc()
_IONBF = 2

CHUNK_CHARS = 16_384
FRAME_CHARS = 8_192
"""Most characters per Log frame (half that for non-ASCII text): at most about 48 KiB
encoded, within every frame bound (a run's is max_result_bytes plus 64 KiB)."""
FLUSH_S = 0.2


class Outbox:
    """Pending output, in order: (stream, text) segments. Active during the zygote's setup
    and in a run; otherwise what the zygote writes goes nowhere, like its descriptors 1
    and 2."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.active = False
        self._segments: list[list[str]] = []
        self._size = 0
        self._flushed_at = time.monotonic()

    def add(self, stream: str, text: str) -> None:
        if not self.active:
            return
        if self._segments and self._segments[-1][0] == stream:
            self._segments[-1].append(text)
        else:
            self._segments.append([stream, text])
        self._size += len(text)
        if self._size >= CHUNK_CHARS or (
                "\n" in text and time.monotonic() - self._flushed_at >= FLUSH_S):
            self.flush()

    def flush(self) -> None:
        if not self.active:
            return
        segments, self._segments, self._size = self._segments, [], 0
        for stream, *parts in segments:
            text = "".join(parts)
            # Frames stay far below the channel's bound, however large one write was.
            step = FRAME_CHARS if text.isascii() else FRAME_CHARS // 2
            for start in range(0, len(text), step):
                channel.send_message(self.fd, Log(stream=stream, text=text[start:start + step]))
        self._flushed_at = time.monotonic()


class ChannelStream(io.TextIOBase):
    def __init__(self, outbox: Outbox, stream: str) -> None:
        super().__init__()
        self._outbox = outbox
        self._stream = stream

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._outbox.add(self._stream, text)
        return len(text)

    def flush(self) -> None:
        self._outbox.flush()


_outbox: list[Outbox] = []
"""The zygote's one outbox, once prepared: its setup's, then its runs'."""


def prepare(fd: int) -> None:
    """In the zygote, before its setup (whose output goes to the pool child's setup
    supervisor) and again after it: sys.stdout and sys.stderr are the channel's streams
    (whatever the setup put there), inactive until a run captures them (every object a
    run builds or rebinds after the fork is a page copied in the run, so a run only flips
    a flag). One outbox for both, so a `ctx.logger` the setup attached keeps working."""
    if not _outbox or _outbox[0].fd != fd:
        _outbox[:] = [Outbox(fd)]
    outbox = _outbox[0]
    sys.stdout = ChannelStream(outbox, "stdout")
    sys.stderr = ChannelStream(outbox, "stderr")


def release() -> None:
    """In the zygote after its setup: what the setup wrote goes out, then nothing more
    until a run captures (the zygote's own output, and a teardown's, go nowhere)."""
    with contextlib.suppress(Exception):  # C's buffers, if the setup buffered them again:
        _libc.fflush(None)  # a fork would copy them into every run
    flush_all()
    for outbox in _outbox:
        outbox.active = False


def capture() -> None:
    """In the zygote before its setup, and in a run before plugin code: stdout, stderr and
    `ctx.logger` go to the channel."""
    outbox = _outbox[0]
    outbox._flushed_at = time.monotonic()
    outbox.active = True


def flush_all() -> None:
    """Before the Result frame: what is buffered goes first. A channel that is gone fails
    the Result's send the same way, so it is not reported here."""
    try:
        for outbox in _outbox:
            outbox.flush()
    except Exception:  # also a MemoryError: a setup that failed for memory still reports
        return


class _WholeWrites(io.FileIO):
    """A descriptor whose every write is written whole: TextIOWrapper ignores a short write
    (a signal mid-write to a full pipe, or a descriptor a plugin made non-blocking)."""

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            written = super().write(view[done:])
            if written is None:  # non-blocking and full: wait until it can take more
                select.select([], [self], [], 1.0)
                continue
            done += written
        return done


def unbuffer_descriptors() -> None:
    """In the zygote, before its setup: what is written to descriptors 1 and 2 through
    Python's original streams (`sys.__stdout__`) or C's stdio (`printf`) goes out at once.
    A run ends with `_exit` (or a kill), which would lose a buffer, and flushing them in
    every run would cost it about 30 copied pages."""
    for name, fd in (("__stdout__", 1), ("__stderr__", 2)):
        with contextlib.suppress(OSError, ValueError):
            setattr(sys, name, io.TextIOWrapper(
                _WholeWrites(fd, "w", closefd=False), encoding="utf-8",  # type: ignore[arg-type]
                errors="backslashreplace", write_through=True))
    with contextlib.suppress(Exception):
        for name in ("stdout", "stderr"):
            _libc.setvbuf(ctypes.c_void_p.in_dll(_libc, name), None, _IONBF, 0)


def attach(logger: logging.Logger) -> logging.Logger:
    """`ctx.logger` writes its records to the `log` stream (once per logger)."""
    import logging  # imported on first use: its fork handlers cost each run CPU

    if _outbox and not any(getattr(h, "_pluginpool", False) for h in logger.handlers):
        handler = logging.StreamHandler(ChannelStream(_outbox[0], "log"))
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._pluginpool = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    return logger
