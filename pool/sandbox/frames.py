"""The pool child's reads and writes on a sandbox's sockets, never blocked by the sandbox.

A zygote or a run may be hostile: it can send half a frame and stop, or ask for storage and
never read the replies. channel.py's own reads and writes block until a whole frame has
passed (right inside the sandbox, whose peer is the worker); here every read and write has a
deadline, and a run's channel is read as bytes arrive, so the supervisor's clocks (wall
clock, samples, CPU share) keep running while a frame is incomplete.
"""

from __future__ import annotations

import array
import functools
import os
import select
import socket
import time
from collections.abc import Callable

from pluginpool.pool.sandbox.runtime import channel
from pluginpool.pool.sandbox.runtime.messages import Message, decode

HEADER_BYTES = channel.HEADER.size
READ_CHUNK = 1 << 16


class FrameDeadline(TimeoutError):
    """A frame was not read (or written) whole before the deadline."""


class FrameReader:
    """Frames from one socket, decoded as they complete: `read` takes what has arrived
    (call it when poll says the socket is readable) and returns the whole frames in it; a
    partial frame waits in the buffer. A header over `max_bytes` is refused at once
    (FrameTooLarge), before its body is read; a frame that is not a message is a
    ProtocolError (ValueError)."""

    def __init__(self, fd: int, *, max_bytes: int) -> None:
        self.fd = fd
        self.max_bytes = max_bytes
        self.closed = False
        """The other end is gone (what it sent whole before was returned)."""
        self.bytes_read = 0
        self._buffer = bytearray()
        self._needed = HEADER_BYTES
        """Bytes the partial frame in the buffer needs before it can be parsed."""

    def read(self) -> list[Message]:
        try:
            chunk = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return []
        if not chunk:
            self.closed = True
            return []
        self.bytes_read += len(chunk)
        if self._buffer:  # a frame in parts: gathered until it is whole
            self._buffer += chunk
            if len(self._buffer) < self._needed:
                return []
            data, self._buffer = bytes(self._buffer), bytearray()
        else:  # the usual case: whole frames in one read, parsed where they are
            data = chunk
        messages: list[Message] = []
        pos, total = 0, len(data)
        self._needed = HEADER_BYTES
        while total - pos >= HEADER_BYTES:
            (size,) = channel.HEADER.unpack_from(data, pos)
            if size > self.max_bytes:
                raise channel.FrameTooLarge(size, self.max_bytes)
            end = pos + HEADER_BYTES + size
            if total < end:
                self._needed = end - pos
                break
            messages.append(decode(channel.frame_dict(data[pos + HEADER_BYTES:end])))
            pos = end
        if pos < total:
            self._buffer += memoryview(data)[pos:]
        return messages


def _poller(fd: int, events: int) -> select.poll:
    poller = select.poll()  # not select(): descriptor numbers may pass 1024
    poller.register(fd, events)
    return poller


def _wait(poller: select.poll, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0 or not poller.poll(left * 1000):
        raise FrameDeadline("no frame within the deadline")


def read_exactly_by(fd: int, size: int, deadline: float,
                    poller: select.poll | None = None) -> bytes:
    """`size` bytes, waiting at most until `deadline` (monotonic) for them."""
    poller = poller or _poller(fd, select.POLLIN | select.POLLHUP)
    chunks = []
    while size:
        _wait(poller, deadline)
        try:
            chunk = os.read(fd, min(size, 1 << 20))
        except BlockingIOError:
            continue
        if not chunk:
            raise channel.ChannelClosed
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def receive_by(fd: int, *, max_bytes: int, deadline: float) -> Message:
    """One message, whole before `deadline` or FrameDeadline; it reads no byte past its
    frame (the next one stays for the next reader)."""
    poller = _poller(fd, select.POLLIN | select.POLLHUP)
    (size,) = channel.HEADER.unpack(read_exactly_by(fd, HEADER_BYTES, deadline, poller))
    if size > max_bytes:
        raise channel.FrameTooLarge(size, max_bytes)
    return decode(channel.frame_dict(read_exactly_by(fd, size, deadline, poller)))


def send_by(fd: int, message: Message, deadline: float) -> None:
    """One message, written whole before `deadline` or FrameDeadline (a sandbox that does
    not read its replies fills the socket: the writer must not wait for it for ever)."""
    was_blocking = os.get_blocking(fd)
    if was_blocking:
        os.set_blocking(fd, False)
    try:
        _write_all(functools.partial(os.write, fd), fd,
                   memoryview(channel.frame_of(message)), deadline)
    finally:
        if was_blocking:
            os.set_blocking(fd, True)


def send_with_fd_by(sock: socket.socket, message: Message, passed: int,
                    deadline: float) -> None:
    """One message and a descriptor with it (SCM_RIGHTS, with its first bytes), written
    whole before `deadline` or FrameDeadline: a zygote that stops reading its control
    socket must not hold the pool child until Celery's soft limit (a Spawn carries the
    job's payload, larger than the socket's buffer)."""
    view = memoryview(channel.frame_of(message))
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [passed]))]
    # sendmsg itself: socket.send_fds drops its flags argument (CPython 3.11)
    sent = _write_all(
        lambda data: sock.sendmsg([data], ancillary, socket.MSG_DONTWAIT), sock.fileno(),
        view, deadline, first_only=True)
    _write_all(lambda data: sock.send(data, socket.MSG_DONTWAIT), sock.fileno(),
               view[sent:], deadline)


def _write_all(write: Callable[[memoryview], int], fd: int, view: memoryview,
               deadline: float, *, first_only: bool = False) -> int:
    """Write `view` with a non-blocking `write`, waiting (until `deadline`) whenever the
    socket is full; with `first_only`, only until one write has taken some of it. How
    many bytes went."""
    poller: select.poll | None = None
    sent = 0
    while sent < len(view):
        try:
            sent += write(view[sent:])
        except BlockingIOError:
            poller = poller or _poller(fd, select.POLLOUT)
            _wait(poller, deadline)
            continue
        if first_only:
            break
    return sent
