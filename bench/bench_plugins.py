"""Plugins used by the sandbox benchmark."""

from __future__ import annotations

import json
import time
from typing import Any


def noop(ctx: Any, payload: Any) -> Any:
    return payload


def _touch(mb: int) -> bytearray:
    block = bytearray(mb * 1024 * 1024)
    block[::4096] = b"x" * len(block[::4096])
    return block


def cross_memory_limit(ctx: Any, payload: Any) -> Any:
    """Fill memory to just under the limit, note the time, cross it in one small step (a
    few milliseconds of page faults), then wait to be stopped."""
    below = _touch(int(payload["below_mb"]))
    ctx.storage.set("crossing_at", time.time())
    above = _touch(int(payload["step_mb"]))
    time.sleep(60)
    return len(below) + len(above)


def busy(ctx: Any, payload: Any) -> Any:
    deadline = time.monotonic() + float(payload.get("seconds", 3600))
    spins = 0
    while time.monotonic() < deadline:
        spins += 1
    return spins


def count_and_sleep(ctx: Any, payload: Any) -> Any:
    """Counts every execution of a job id in Redis (duplicates show), then sleeps."""
    import redis

    client = redis.Redis.from_url(payload["redis_url"])
    client.hincrby(payload["key"], ctx.job_id, 1)
    client.close()
    time.sleep(float(payload.get("seconds", 0.05)))
    return payload.get("n")


def sleep(ctx: Any, payload: Any) -> Any:
    time.sleep(float(payload["seconds"]))
    return None


class SlowSetup:
    """A plugin whose setup takes a second (a model, a table, a client), then cheap runs."""

    def __init__(self, ctx: Any) -> None:
        time.sleep(float(ctx.initial_data.get("setup_s", 1.0)))
        self.table = {"ready": True}

    def run(self, ctx: Any, payload: Any) -> Any:
        return self.table


FORKER = """
import json, os, sys
fd = int(sys.argv[1])
json.dumps({"ok": True})
while os.read(fd, 1):
    pid = os.fork()
    if pid == 0:
        os.write(fd, json.dumps({"ok": True}).encode())
        os._exit(0)
    os.wait4(pid, 0)
"""


class ForkFloor:
    """The least a fresh process per run from a zygote can cost, for bench.sandbox's
    floor: unsandboxed, each run asks a stdlib-only interpreter started at setup to fork a
    child that writes one JSON reply and exits; that interpreter reaps it. No lock-down,
    no supervision, no workspace, no usage, symbols bound at start and the reply's encoder
    warmed before the first fork (as a zygote does): what any zygote design pays at the
    least."""

    def __init__(self, ctx: Any) -> None:
        import socket
        import subprocess
        import sys

        ours, theirs = socket.socketpair()
        self.sock = ours
        self.forker = subprocess.Popen([sys.executable, "-I", "-S", "-c", FORKER,
                                        str(theirs.fileno())],
                                       pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                       env={"LD_BIND_NOW": "1"})
        theirs.close()

    def run(self, ctx: Any, payload: Any) -> Any:
        self.sock.sendall(b"x")
        return json.loads(self.sock.recv(4096))

    def close(self) -> None:
        self.sock.close()
        self.forker.wait(timeout=5)
