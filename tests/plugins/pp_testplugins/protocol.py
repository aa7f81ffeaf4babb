"""Class plugins that break the sandbox's wire protocol from inside it.

A setup runs in the zygote and can rewrite the runtime there; a run can write anything on
its channel (descriptor 3 in a run, as the control socket is in the zygote). Each one here
must end in a typed error with the worker unharmed.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import time
from typing import Any

CHANNEL_FD = 3
"""A run's channel, and the zygote's control socket (runtime/run.py: CHANNEL_FD, CONTROL_FD)."""


def _frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


class ForgesRunPid:
    """Its setup makes the zygote name `initial_data["pid"]` as each run's pid (0: the pool
    child's own process group, which holds the whole worker)."""

    def __init__(self, ctx: Any) -> None:
        forged = int(ctx.initial_data.get("pid", 0))
        run = sys.modules["pluginpool_sandbox_runtime.run"]
        run.forked_frame = lambda _pid, rss: (  # type: ignore[attr-defined]
            b'{"op": "forked", "pid": %d, "zygote_rss_bytes": %d}' % (forged, rss))

    def run(self, ctx: Any, payload: Any) -> Any:
        time.sleep(0.5)  # still running when the pool child reads its Forked
        return "ran"


class BreaksTheChannel:
    """Operations that write what no run of ours writes; `close` too, when
    `initial_data["teardown"]` says so."""

    def __init__(self, ctx: Any) -> None:
        self.teardown = ctx.initial_data.get("teardown")

    def run(self, ctx: Any, payload: Any) -> Any:
        return "fine"

    def mistyped(self, ctx: Any, payload: Any) -> Any:
        """A Result whose error names no error type, with details that collide with the
        error's own fields."""
        os.write(CHANNEL_FD, _frame({"op": "result", "ok": False, "error": {
            "type": payload.get("type", "bogus"), "message": "forged",
            "details": {"message": "again", "type_": "x", "usage": {}}}}))
        time.sleep(60)

    def half_frame(self, ctx: Any, payload: Any) -> Any:
        """A header announcing 100 bytes, 5 of them, then silence."""
        os.write(CHANNEL_FD, struct.pack(">I", 100) + b'{"op"')
        time.sleep(60)

    def storage_flood(self, ctx: Any, payload: Any) -> Any:
        """Storage requests, never reading a reply: the pool child's replies fill the
        socket."""
        request = _frame({"op": "storage", "action": "get", "key": "k" * 200})
        for _ in range(20_000):
            os.write(CHANNEL_FD, request)
        time.sleep(60)

    def close(self) -> None:
        if self.teardown == "half_frame":
            signal.alarm(0)  # the zygote's own bound on its teardown: off
            os.write(CHANNEL_FD, struct.pack(">I", 100) + b'{"op"')
            time.sleep(60)
