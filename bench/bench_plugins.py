"""Plugins used by the sandbox benchmark."""

from __future__ import annotations

import time
from typing import Any


def noop(ctx: Any, payload: Any) -> Any:
    return payload


def cross_memory_limit(ctx: Any, payload: Any) -> Any:
    """Allocate past the memory limit in one step, note the time, then wait to be stopped."""
    block = bytearray(int(payload["mb"]) * 1024 * 1024)
    block[::4096] = b"x" * len(block[::4096])
    ctx.storage.set("crossed_at", time.time())
    time.sleep(60)
    return len(block)


def busy(ctx: Any, payload: Any) -> Any:
    deadline = time.monotonic() + float(payload.get("seconds", 3600))
    spins = 0
    while time.monotonic() < deadline:
        spins += 1
    return spins
