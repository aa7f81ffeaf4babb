"""Length-prefixed JSON frames over the sockets that cross the sandbox boundary.

Raw file descriptors, no socket objects: the run's process must never close the channel
by garbage collection (seccomp refuses it anyway).
"""

from __future__ import annotations

import os
import struct
from _json import make_scanner
from json import JSONDecoder, JSONEncoder

from .messages import Message, decode, encode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

HEADER = struct.Struct(">I")
_pack = HEADER.pack
_encode = JSONEncoder(allow_nan=False).encode
"""json.dumps(message, allow_nan=False) without building an encoder per frame."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"frame holds {name}, which is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value - value != 0:  # 1e999 reads as an infinity
        raise ValueError(f"frame holds {text[:32]}, which is no finite number")
    return value


_scan = make_scanner(JSONDecoder(  # type: ignore[arg-type]
    parse_constant=_no_constant, parse_float=_finite))
"""json's C scanner, without json.loads's Python layers around it; NaN and the infinities
are refused (JSON has none, and a sandbox's figures must be numbers)."""


def loads(data: bytes) -> Any:
    """json.loads for a frame: one JSON document, nothing before or after it."""
    text = data.decode()
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("frame is not JSON") from None
    except RecursionError:  # a run's frame nested too deep: refused like any bad frame
        raise ValueError("frame is nested too deeply") from None
    if end != len(text):
        raise ValueError("frame has data after its JSON")
    return value


class ChannelClosed(EOFError):
    """The other end is gone."""


class FrameTooLarge(ValueError):
    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"frame of {size} bytes over the {limit}-byte limit")


def send(fd: int, message: dict[str, Any]) -> None:
    # The encoder is built at import, but json.encoder's C helpers are looked up at each
    # call: plugin code in this process can change what it sends, as it can by writing to
    # the descriptor itself. The pool child checks every frame (messages.decode).
    send_frame(fd, _encode(message).encode())


def send_frame(fd: int, data: bytes) -> None:
    """One frame whose JSON is already encoded (messages.py's *_frame helpers)."""
    frame = _pack(len(data)) + data
    written = os.write(fd, frame)
    if written == len(frame):  # the usual case: one write, nothing more built
        return
    view = memoryview(frame)[written:]
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_exactly(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise ChannelClosed
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def receive(fd: int, *, max_bytes: int) -> dict[str, Any]:
    """One frame. A frame over `max_bytes` is refused before it is read."""
    (size,) = HEADER.unpack(read_exactly(fd, HEADER.size))
    if size > max_bytes:
        raise FrameTooLarge(size, max_bytes)
    return frame_dict(read_exactly(fd, size))


def frame_dict(body: bytes) -> dict[str, Any]:
    """A frame's body as the JSON object every message is (messages.decode types it)."""
    message = loads(body)
    if not isinstance(message, dict):
        raise ValueError("frame is not a JSON object")
    return message


def body_of(message: Message) -> bytes:
    """A message's JSON, without the header (a SOCK_SEQPACKET datagram carries one whole)."""
    return _encode(encode(message)).encode()


def frame_of(message: Message) -> bytes:
    """A message's whole frame: header and JSON."""
    data = body_of(message)
    return _pack(len(data)) + data


def send_message(fd: int, message: Message) -> None:
    send(fd, encode(message))


def receive_message(fd: int, *, max_bytes: int) -> Message:
    return decode(receive(fd, max_bytes=max_bytes))
