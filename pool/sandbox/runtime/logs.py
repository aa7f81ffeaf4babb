"""A run's stdout, stderr and `ctx.logger`, sent to the supervisor as Log frames.

Standard library only (imported in the zygote). The three streams share one buffer, so
their lines arrive in the order they were written; it is sent every CHUNK_CHARS, on a
line once FLUSH_S has passed, when a stream is flushed, and before the Result. The cap
is the supervisor's (tasks/run_logs.py), not this module's: a plugin that writes around
these objects only reaches the same channel, or /dev/null.
"""

from __future__ import annotations

import io
import sys
import time
from typing import TYPE_CHECKING

from . import channel
from .messages import Log

if TYPE_CHECKING:
    import logging

CHUNK_CHARS = 16_384
FLUSH_S = 0.2


class Outbox:
    """The run's pending output, in order: (stream, text) segments."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._segments: list[list[str]] = []
        self._size = 0
        self._flushed_at = time.monotonic()

    def add(self, stream: str, text: str) -> None:
        if self._segments and self._segments[-1][0] == stream:
            self._segments[-1].append(text)
        else:
            self._segments.append([stream, text])
        self._size += len(text)
        if self._size >= CHUNK_CHARS or (
                "\n" in text and time.monotonic() - self._flushed_at >= FLUSH_S):
            self.flush()

    def flush(self) -> None:
        segments, self._segments, self._size = self._segments, [], 0
        for stream, *parts in segments:
            channel.send_message(self.fd, Log(stream=stream, text="".join(parts)))
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
"""The run's outbox, once captured (empty in the zygote: its own writes go nowhere)."""
_prepared: list[tuple[Outbox, ChannelStream, ChannelStream]] = []


def prepare(fd: int) -> None:
    """In the zygote, once: the run's outbox and streams, built before any fork so a run
    only installs them (objects built in the run are pages copied in the run)."""
    outbox = Outbox(fd)
    _prepared[:] = [(outbox, ChannelStream(outbox, "stdout"), ChannelStream(outbox, "stderr"))]


def capture() -> None:
    """In the run, before plugin code: sys.stdout and sys.stderr become the channel."""
    outbox, stdout, stderr = _prepared[0]
    outbox._flushed_at = time.monotonic()
    _outbox[:] = [outbox]
    sys.stdout = stdout
    sys.stderr = stderr


def flush_all() -> None:
    """Before the Result frame: what is buffered goes first. A channel that is gone fails
    the Result's send the same way, so it is not reported here."""
    try:
        for outbox in _outbox:
            outbox.flush()
    except (OSError, EOFError, ValueError):
        return


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
