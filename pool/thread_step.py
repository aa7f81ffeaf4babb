"""A worker bootstep that runs one background thread in the worker's main process.

The registry follower and the cancel listener each follow a Redis channel from a thread
of their own; this is their shared start and stop: a daemon thread, a stop event, and a
bounded join so a stuck Redis call cannot hold up a warm shutdown.
"""

from __future__ import annotations

import threading
from typing import Any, TypeVar, cast

from celery import bootsteps

from pluginpool.pool.worker_services import WorkerServices

Step = TypeVar("Step", bound=type)


def bound_step(step: Step, **deps: Any) -> Step:
    """`step` with what it needs bound as class attributes. Celery instantiates bootsteps
    itself, from the class a worker adds, so that class carries the worker's services:
    nothing is looked up on the app."""
    return cast(Step, type(step.__name__, (step,), {"__module__": step.__module__, **deps}))

JOIN_TIMEOUT_S = 5.0


class ThreadStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Subclasses set `thread_name`, prepare in `setup(worker)` and loop in `run()` until
    `self._stop` is set."""

    requires = ("celery.worker.components:Timer",)
    thread_name = "pluginpool-step"
    services: WorkerServices  # bound by the worker (`bound_step`)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def setup(self, worker: Any) -> None:
        """Read what the thread needs from the worker (called before it starts)."""

    def run(self) -> None:
        raise NotImplementedError

    def start(self, worker: Any) -> None:
        self.setup(worker)
        self._thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=JOIN_TIMEOUT_S)
