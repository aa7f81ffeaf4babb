"""Class plugins with a lifecycle: set up once per warm sandbox, operations by name,
teardown on unload. Setup and teardown leave traces in the instance's storage."""

from __future__ import annotations

import os
from typing import Any


class Stateful:
    """Counts its setups, keeps a list that every run mutates, records its teardown."""

    def __init__(self, ctx: Any) -> None:
        self.storage = ctx.storage
        self.setups = int(ctx.storage.get("setups") or 0) + 1
        ctx.storage.set("setups", self.setups)
        self.items = list(ctx.initial_data.get("items", []))
        self.zygote_pid = os.getpid()

    def run(self, ctx: Any, payload: Any) -> Any:
        self.items.append(payload.get("add"))
        return {"items": self.items, "pid": os.getpid(), "zygote": self.zygote_pid,
                "parent": os.getppid(), "setups": self.setups, "operation": ctx.operation}

    def summarize(self, ctx: Any, payload: Any) -> Any:
        return {"count": len(self.items), "job_id": ctx.job_id}

    def allocate(self, ctx: Any, payload: Any) -> Any:
        block = bytearray(int(payload["mb"]) * 1024 * 1024)
        block[::4096] = b"x" * len(block[::4096])
        return len(block)

    def open_files(self, ctx: Any, payload: Any) -> Any:
        return [open(ctx.workspace / f"f{i}", "w") for i in range(int(payload["n"]))] and "open"

    def sleep(self, ctx: Any, payload: Any) -> Any:
        import time
        time.sleep(float(payload["seconds"]))
        return "slept"

    def kill_zygote(self, ctx: Any, payload: Any) -> Any:
        import signal
        if payload.get("native"):
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            return {"result": libc.kill(os.getppid(), signal.SIGKILL), "errno": ctypes.get_errno()}
        os.kill(os.getppid(), signal.SIGKILL)
        return "killed"

    def close(self) -> None:
        """The teardown: the worker logs that it ran (the instance's storage is already
        gone when it was unloaded)."""
        self.items.clear()


class Chatty:
    """Writes in its setup (then takes sys.stdout for itself) and in each run."""

    def __init__(self, ctx: Any) -> None:
        import io
        import sys
        print("setup is loading its table")
        ctx.logger.info("setup logger says hello")
        sys.stdout = io.StringIO()  # a setup that keeps stdout: runs still reach the logs

    def run(self, ctx: Any, payload: Any) -> Any:
        print("run", payload["n"])
        ctx.logger.info("run logger %s", payload["n"])
        return payload["n"]


class PrintsHugeSetup:
    """Its setup prints one 2 MB string (one write, more than a frame may hold)."""

    def __init__(self, ctx: Any) -> None:
        print("z" * 2_000_000)
        print("setup done")

    def run(self, ctx: Any, payload: Any) -> Any:
        return "ran"


class LoudTeardown:
    """Its teardown writes more than a pipe holds straight to descriptor 1."""

    def __init__(self, ctx: Any) -> None:
        self.zygote = os.getpid()

    def run(self, ctx: Any, payload: Any) -> Any:
        return {"zygote": self.zygote}

    def close(self) -> None:
        os.write(1, b"t" * 300_000)


CLOSED: list[str] = []
"""The instances RecordsClose tore down, for tests that run plugins in their own process."""


class RecordsClose:
    def __init__(self, ctx: Any) -> None:
        self.instance_id = ctx.instance_id

    def run(self, ctx: Any, payload: Any) -> Any:
        return "ran"

    def close(self) -> None:
        CLOSED.append(self.instance_id)


class HangsAtClose:
    """Its teardown never returns."""

    def __init__(self, ctx: Any) -> None:
        pass

    def run(self, ctx: Any, payload: Any) -> Any:
        return "ran"

    def close(self) -> None:
        import time
        time.sleep(3600)


class ClosesBadly:
    """Its teardown prints, then raises."""

    def __init__(self, ctx: Any) -> None:
        self.job_in_setup = ctx.job_id

    def run(self, ctx: Any, payload: Any) -> Any:
        return {"job_in_setup": self.job_in_setup}

    def close(self) -> None:
        print("closing badly")
        raise RuntimeError("close exploded")


class FailsSetup:
    def __init__(self, ctx: Any) -> None:
        raise KeyError("missing config")

    def run(self, ctx: Any, payload: Any) -> Any:
        return "never"


class PrintsAtClose:
    """Its teardown prints for a while."""

    def __init__(self, ctx: Any) -> None:
        pass

    def run(self, ctx: Any, payload: Any) -> Any:
        return "ran"

    def close(self) -> None:
        import time
        for _ in range(20):
            print("closing")
            time.sleep(0.05)


class SleepsThenChecks:
    """Sleeps in its run, then says whether its teardown ran meanwhile."""

    def __init__(self, ctx: Any) -> None:
        self.closed = False

    def run(self, ctx: Any, payload: Any) -> Any:
        import time
        time.sleep(float(payload["seconds"]))
        return {"closed_during_run": self.closed}

    def close(self) -> None:
        self.closed = True


class TwoOps:
    """Operations `run` and `other`, each answering its own name."""

    def __init__(self, ctx: Any) -> None:
        pass

    def run(self, ctx: Any, payload: Any) -> Any:
        return "run"

    def other(self, ctx: Any, payload: Any) -> Any:
        return "other"
