"""CPU hogs for the throttle: threads share their process's CPU budget."""

from __future__ import annotations

import os
import threading
import time
from typing import Any


def threaded_hog(ctx: Any, payload: Any) -> Any:
    """Spin in `threads` threads (the main one included) for `seconds` of wall time."""
    deadline = time.monotonic() + float(payload["seconds"])
    spins = [0] * int(payload.get("threads", 3))

    def spin(slot: int) -> None:
        while time.monotonic() < deadline:
            spins[slot] += 1

    workers = [threading.Thread(target=spin, args=(slot,)) for slot in range(1, len(spins))]
    for worker in workers:
        worker.start()
    spin(0)
    for worker in workers:
        worker.join()
    return sum(spins)


def throttled_storage(ctx: Any, payload: Any) -> Any:
    """Reads a stored value larger than the channel's socket buffer, over and over, while a
    second thread writes straight to descriptor 1. The pool child then often turns from
    that output to its throttle, stops the run (SIGSTOP, for its CPU share) and only then
    finds a storage request waiting: it must let the run read the reply."""
    big = "x" * int(payload.get("bytes", 600_000))
    ctx.storage.set("big", big)
    deadline = time.monotonic() + float(payload["seconds"])

    def chatter() -> None:
        while time.monotonic() < deadline:
            os.write(1, b"." * 64 + b"\n")

    writer = threading.Thread(target=chatter)
    writer.start()
    reads = 0
    while time.monotonic() < deadline:
        if len(ctx.storage.get("big")) != len(big):
            raise AssertionError("a storage reply came back cut")
        reads += 1
    writer.join()
    return reads
