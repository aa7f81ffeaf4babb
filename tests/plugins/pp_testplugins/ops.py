"""Test plugins for operator actions and run logs."""

from __future__ import annotations

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
