"""Test plugins for operator actions and run logs."""

from __future__ import annotations

import os
import sys
import time
from typing import Any


def sleeps(ctx: Any, payload: Any) -> Any:
    time.sleep(float((payload or {}).get("seconds", 0)))
    return {"slept": (payload or {}).get("seconds", 0)}


def talks(ctx: Any, payload: Any) -> Any:
    """Writes to all three of its log streams, then succeeds or fails as asked."""
    print(f"to stdout {payload['tag']}")
    print(f"to stderr {payload['tag']}", file=sys.stderr)
    ctx.logger.warning("to the logger %s", payload["tag"])
    if payload.get("fail"):
        raise RuntimeError(f"failed on purpose {payload['tag']}")
    return "said it"


def floods(ctx: Any, payload: Any) -> Any:
    """Prints `mb` megabytes, line by line, then succeeds."""
    line = "x" * 1023 + "\n"
    for _ in range(int(payload["mb"]) * 1024):
        sys.stdout.write(line)
    sys.stdout.flush()
    return "flooded"


def writes_fds(ctx: Any, payload: Any) -> Any:
    """Writes straight to descriptors 1 and 2 (as C code would), optionally through a
    process it starts, then succeeds or fails as asked."""
    tag = payload["tag"]
    os.write(1, f"fd 1 {tag}\n".encode())
    os.write(2, f"fd 2 {tag}\n".encode())
    if payload.get("child"):  # a process of its own, writing to what it inherited
        pid = os.fork()
        if pid == 0:
            os.write(1, f"child {tag}\n".encode())
            os.write(2, f"child error {tag}\n".encode())
            os._exit(0)
        os.waitpid(pid, 0)
    if payload.get("buffered"):  # left in buffers: the run ends with _exit
        import ctypes
        sys.__stdout__.write(f"buffered python {tag}\n")
        ctypes.CDLL(None).printf(f"buffered c {tag}\n".encode())
    if payload.get("nonblocking_big"):  # one write, more than the pipe holds
        os.set_blocking(1, False)
        try:
            sys.__stdout__.write("x" * 200_000 + f"\nend of the big write {tag}\n")
        finally:
            os.set_blocking(1, True)
    if payload.get("mb"):
        block = b"y" * 1023 + b"\n"
        for _ in range(int(payload["mb"]) * 1024):
            os.write(1, block)
    if payload.get("fail"):
        raise RuntimeError(f"failed on purpose {tag}")
    return "wrote"


class SetupWritesFd:
    """Its setup writes straight to descriptor 2."""

    def __init__(self, ctx: Any) -> None:
        os.write(2, b"setup wrote to fd 2\n")

    def run(self, ctx: Any, payload: Any) -> Any:
        return writes_fds(ctx, payload)
