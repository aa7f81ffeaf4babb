"""Exceptions and lookups that break the code describing them: a __str__ that raises, a
5 MB message, a listed operation that is a raising property, a KeyboardInterrupt."""

from __future__ import annotations

from typing import Any


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str fails")


def raises_unprintable(ctx: Any, payload: Any) -> Any:
    ctx.storage.set("runs", int(ctx.storage.get("runs") or 0) + 1)
    raise Unprintable()


def raises_huge_message(ctx: Any, payload: Any) -> Any:
    raise ValueError("z" * 5_000_000)


def raises_keyboard_interrupt(ctx: Any, payload: Any) -> Any:
    raise KeyboardInterrupt


class SetupUnprintable:
    def __init__(self, ctx: Any) -> None:
        raise Unprintable()


class SetupHugeMessage:
    def __init__(self, ctx: Any) -> None:
        raise ValueError("q" * 3_000_000)


class RaisingProperty:
    """`operations = ["run", "boom"]`: reading `boom` raises."""

    def __init__(self, ctx: Any) -> None:
        self.ready = True

    def run(self, ctx: Any, payload: Any) -> Any:
        return self.ready

    @property
    def boom(self) -> Any:
        raise RuntimeError("property boom")


def writes_after(ctx: Any, payload: Any) -> Any:
    """Sleeps, then writes its instance's storage: the name of what the write raised."""
    import time

    time.sleep(float(payload.get("seconds", 0)))
    try:
        ctx.storage.set("late", True)
    except Exception as exc:
        return [type(exc).__name__, isinstance(exc, ValueError)]
    return "written"


def logs_at_every_level(ctx: Any, payload: Any) -> Any:
    ctx.logger.debug("a debug line")
    ctx.logger.info("an info line")
    return ctx.logger.isEnabledFor(10)
