"""A zygote's descriptors 1 and 2: pipes the pool child reads, so what a setup or a run
writes to them directly (a C extension, a process it started, `sys.__stdout__`) reaches the
run's logs like its `print` and `ctx.logger` output, which travel as frames on its channel.

Each zygote gets two pipes when it starts; it and every run it forks hold the write ends,
the pool child the read ends (non-blocking). A zygote serves one run at a time and kills
what a run leaves before it reports the run's exit, so what is read while a run is watched,
and drained once it has exited, is that run's. The order between these bytes and the
channel's frames is the order they arrived in, not always the order they were written.
"""

from __future__ import annotations

import codecs
import contextlib
import os

from pluginpool.tasks.run_logs import LogTail

READ_BYTES = 65_536
DRAIN_READS = 16
"""At most this many reads per pipe once a run has ended (1 MiB): its writers are gone, so
this bounds only a pipe some escaped process still feeds."""


class OutputPipes:
    """The read ends of one zygote's stdout and stderr pipes."""

    def __init__(self, stdout_fd: int, stderr_fd: int) -> None:
        self.fds: tuple[int, ...] = (stdout_fd, stderr_fd)
        self._streams = {stdout_fd: "stdout", stderr_fd: "stderr"}
        self._decoders = {fd: codecs.getincrementaldecoder("utf-8")(errors="replace")
                          for fd in self.fds}
        for fd in self.fds:
            os.set_blocking(fd, False)

    @classmethod
    def create(cls) -> tuple[OutputPipes, tuple[int, int]]:
        """New pipes: the pool child's ends, and the write ends for the zygote's 1 and 2
        (the caller closes them once the zygote holds them)."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        return cls(out_r, err_r), (out_w, err_w)

    def read(self, fd: int, logs: LogTail) -> bool:
        """One read of `fd` into `logs`; False at its end (every writer gone) or error."""
        try:
            data = os.read(fd, READ_BYTES)
        except BlockingIOError:
            return True
        except OSError:
            return False
        self._decode(fd, data, logs, final=not data)
        return bool(data)

    def drain(self, logs: LogTail) -> None:
        """What is left in both pipes, into `logs` (after the run has exited)."""
        for fd in self.fds:
            for _ in range(DRAIN_READS):
                try:
                    data = os.read(fd, READ_BYTES)
                except OSError:  # BlockingIOError: nothing left
                    break
                self._decode(fd, data, logs)
                if not data:
                    break
            # A run's last partial character does not run into the next run's output.
            self._decode(fd, b"", logs, final=True)

    def _decode(self, fd: int, data: bytes, logs: LogTail, *, final: bool = False) -> None:
        text = self._decoders[fd].decode(data, final=final)
        if text:
            logs.add(self._streams[fd], text)

    def poll_read(self, logs: LogTail) -> None:
        """One read of each pipe, whatever poll says (while the channel is closed)."""
        for fd in self.fds:
            self.read(fd, logs)

    def close(self) -> None:
        """Once: a second call must not close descriptors that reuse the numbers."""
        fds, self.fds = self.fds, ()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
