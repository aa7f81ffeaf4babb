"""Plugins that go wrong in the ways real plugins do."""

from __future__ import annotations

import os
import random
import time
from typing import Any


def flaky(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Raise on a share of runs (`payload["failure_rate"]`, default 0.3)."""
    if random.random() < float(payload.get("failure_rate", 0.3)):
        raise ValueError("upstream service returned garbage")
    return {"ok": True}


def sleepy(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Sleep `payload["seconds"]`, which may be past its timeout."""
    time.sleep(float(payload.get("seconds", 10)))
    return {"slept": payload.get("seconds", 10)}


def crasher(ctx: Any, payload: Any) -> None:
    """Kill its own process, as a native extension gone wrong would."""
    os._exit(13)
