"""Class plugins whose setup misbehaves; `initial_data["action"]` picks how."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import threading
import time
from typing import Any


class Raises:
    def __init__(self, ctx: Any) -> None:
        print("setup is looking for its model")
        ctx.logger.warning("no model under %s", ctx.workspace)
        raise ValueError("setup cannot find its model")

    def run(self, ctx: Any, payload: Any) -> Any:
        return "never"


class Hangs:
    def __init__(self, ctx: Any) -> None:
        time.sleep(3600)

    def run(self, ctx: Any, payload: Any) -> Any:
        return "never"


class TalksUntilStopped:
    """Its setup writes and asks for storage without end, swallowing every error: its
    zygote must still end with its pool child (a write to the gone socket, a storage call
    blocked reading it, get no SIGIO)."""

    def __init__(self, ctx: Any) -> None:
        while True:
            try:
                print("still setting up", flush=True)
                ctx.storage.get("progress")
            except Exception:
                pass
            time.sleep(0.005)

    def run(self, ctx: Any, payload: Any) -> Any:
        return "never"


class Spins:
    """Its setup spins for ever: under a CPU limit its zygote is stopped (SIGSTOP) most of
    the time, and cannot watch for anything then."""

    def __init__(self, ctx: Any) -> None:
        while True:
            pass

    def run(self, ctx: Any, payload: Any) -> Any:
        return "never"


class UndoesTheWatch:
    """Its setup ignores the signal its zygote's watch of the pool child rides on, then
    sleeps for ever: only the owners' sweep can end it."""

    def __init__(self, ctx: Any) -> None:
        import signal
        signal.signal(signal.SIGIO, signal.SIG_IGN)
        while True:
            time.sleep(0.05)

    def run(self, ctx: Any, payload: Any) -> Any:
        return "never"


class Allocates:
    def __init__(self, ctx: Any) -> None:
        self.hoard = []
        while True:
            self.hoard.append(bytearray(8 * 1024 * 1024))
            self.hoard[-1][::4096] = b"x" * len(self.hoard[-1][::4096])

    def run(self, ctx: Any, payload: Any) -> Any:
        return "never"


class StartsThread:
    def __init__(self, ctx: Any) -> None:
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()

    def run(self, ctx: Any, payload: Any) -> Any:
        return "never"


class Forbidden:
    def __init__(self, ctx: Any) -> None:
        action = ctx.initial_data["action"]
        if action == "read":
            with open("/etc/passwd") as handle:
                handle.read()
        elif action == "write":
            with open(ctx.initial_data["path"], "w") as handle:
                handle.write("escaped")
        elif action == "connect":
            socket.create_connection(("127.0.0.1", int(ctx.initial_data["port"])), timeout=2)
        elif action == "spawn":
            subprocess.run(["sh", "-c", "echo pwned"], check=False)
        elif action == "fork" and os.fork() == 0:
            os._exit(0)

    def run(self, ctx: Any, payload: Any) -> Any:
        return "never"


class BreaksThePipes:
    """A setup that leaves the process unable to make pipes (as one holding every descriptor
    would): the zygote's rehearsal of a run needs one; its runs do not."""

    def __init__(self, ctx: Any) -> None:
        def refuse() -> tuple[int, int]:
            raise OSError(24, "Too many open files")
        os.pipe = refuse  # type: ignore[assignment]

    def run(self, ctx: Any, payload: Any) -> Any:
        return {"ran": payload}


class StartsThreadAtCollection:
    """Starts its thread from a gc callback: after the setup's own thread check, at the
    zygote's last collection before it serves runs."""

    def __init__(self, ctx: Any) -> None:
        def start(phase: str, info: Any) -> None:
            if phase == "stop" and not started:
                started.append(True)
                threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()

        started: list[bool] = []
        gc.callbacks.append(start)

    def run(self, ctx: Any, payload: Any) -> Any:
        return "never"


class HoardsDescriptors:
    """Its setup keeps every descriptor it can open but one: the zygote itself needs more
    before it can serve runs."""

    def __init__(self, ctx: Any) -> None:
        self.hoard: list[int] = []
        try:
            while True:
                self.hoard.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            os.close(self.hoard.pop())

    def run(self, ctx: Any, payload: Any) -> Any:
        return "never"


class ForksThenDies:
    """Its setup forks below the audit hook (libc's fork: the zygote may fork), prints the
    child's pid, and ends the zygote; the child would live on."""

    def __init__(self, ctx: Any) -> None:
        import ctypes
        import sys
        child = ctypes.CDLL(None).fork()
        if child == 0:
            time.sleep(3600)
            os._exit(0)
        print(f"forked {child}", flush=True)
        sys.stdout.flush()
        os._exit(1)

    def run(self, ctx: Any, payload: Any) -> Any:
        return "never"
