"""CPU hogs for the throttle: threads share their process's CPU budget."""

from __future__ import annotations

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
