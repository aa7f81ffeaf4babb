"""A run's logs, kept to their last `max_log_bytes` whatever the plugin writes.

The pool child keeps this tail as log frames arrive from the run (a sandboxed run cannot
write anywhere else: its stdout and stderr are the channel, its files are its workspace),
so a run printing 100 MB costs the worker at most max_log_bytes of memory, and Redis the
same per stored run. Rendered as text with one prefix per line naming its stream
(`stdout`, `stderr`, `log`), and a first line saying how much was dropped.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import deque
from collections.abc import Iterator

DROPPED = "[... {} bytes of earlier output dropped ...]\n"
STREAMS = ("stdout", "stderr", "log")

logger = logging.getLogger("pluginpool.runlogs")


class LogTail:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._chunks: deque[tuple[str, str]] = deque()
        self._size = 0
        self.dropped_bytes = 0
        self.total_bytes = 0

    def add(self, stream: str, text: str) -> None:
        stream = stream if stream in STREAMS else "stdout"
        size = len(text.encode(errors="replace"))
        self.total_bytes += size
        if size > self.max_bytes:  # keep its end only
            cut = text.encode(errors="replace")[-self.max_bytes:].decode(errors="replace")
            self.dropped_bytes += size - len(cut.encode())
            text, size = cut, len(cut.encode())
        self._chunks.append((stream, text))
        self._size += size
        while self._size > self.max_bytes and self._chunks:
            _, old = self._chunks.popleft()
            old_size = len(old.encode(errors="replace"))
            self._size -= old_size
            self.dropped_bytes += old_size

    def followed_by(self, later: LogTail) -> LogTail:
        """One tail of this output then `later`'s (a warm sandbox's setup, then the run it
        was set up for), kept to this tail's bound; what either dropped stays counted."""
        joined = LogTail(self.max_bytes)
        for tail in (self, later):
            joined.dropped_bytes += tail.dropped_bytes
            for stream, text in tail._chunks:
                joined.add(stream, text)
        joined.total_bytes = self.total_bytes + later.total_bytes
        return joined

    def text(self) -> str:
        """The kept logs, each line prefixed with its stream."""
        lines: list[str] = [DROPPED.format(self.dropped_bytes)] if self.dropped_bytes else []
        pending: dict[str, str] = {}
        for stream, text in self._chunks:
            text = pending.pop(stream, "") + text
            *complete, rest = text.split("\n")
            lines.extend(f"{stream}: {line}\n" for line in complete)
            if rest:
                pending[stream] = rest
        lines.extend(f"{stream}: {rest}\n" for stream, rest in pending.items())
        return "".join(lines)


def forward(logs: str, *, plugin_id: str, job_id: str, level: str) -> None:
    """Into the worker's log, each line prefixed with plugin and job id (level OFF: not)."""
    if not logs or level == "OFF":
        return
    number = logging.getLevelName(level)
    if not logger.isEnabledFor(number):
        return
    for line in logs.splitlines():
        logger.log(number, "[%s %s] %s", plugin_id, job_id, line)


class _TailStream(io.TextIOBase):
    """A text stream that writes into a LogTail."""

    def __init__(self, tail: LogTail, stream: str) -> None:
        super().__init__()
        self._tail = tail
        self._stream = stream

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._tail.add(self._stream, str(text))
        return len(text)


@contextlib.contextmanager
def captured(plugin_id: str, *, max_bytes: int) -> Iterator[LogTail]:
    """An in-process run's stdout, stderr and `ctx.logger`, kept like a sandboxed run's
    (trusted code: it could write around this, e.g. to file descriptor 1)."""
    tail = LogTail(max_bytes)
    handler = logging.StreamHandler(_TailStream(tail, "log"))
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    plugin_logger = logging.getLogger(f"pluginpool.plugin.{plugin_id}")
    # As in a sandbox: every level kept in the run's logs (the worker logs them at
    # run_log_level), none sent to the worker's own handlers as well.
    level, propagate = plugin_logger.level, plugin_logger.propagate
    plugin_logger.setLevel(logging.DEBUG)
    plugin_logger.propagate = False
    plugin_logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(_TailStream(tail, "stdout")), \
                contextlib.redirect_stderr(_TailStream(tail, "stderr")):
            yield tail
    finally:
        plugin_logger.removeHandler(handler)
        plugin_logger.setLevel(level)
        plugin_logger.propagate = propagate
