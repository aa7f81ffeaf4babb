"""Celery's task events from the worker's main process, sent in batches.

Celery buffers a worker's task events (`task-received`, `task-started`, `task-succeeded`,
...) and publishes what is buffered at the end of each turn of the event loop, as one
`task.multi` message. With prefetch 1 and a few pool processes a turn holds about one job,
so every job paid two or three PUBLISH round trips and their encoding in the main process
(about a third of its CPU per job in `bench.overhead`'s profile). Here the first event
after a quiet spell still goes at the end of its turn; events that follow within
`PLUGINPOOL_EVENT_BATCH_MS` of a publish wait for that window to end and go together.
Celery's own bound still holds: a buffer of 24 events is published at once. What is held
when the broker connection drops is published after the reconnect, and what is held at a
warm shutdown before the dispatcher closes. Receivers
(Flower, the health aggregator, `celery events`) already read `task.multi` lists, each
event keeping its own timestamp; what they see is at most one window late.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from pluginpool.pool.lazy_strategies import LazyStrategyConsumer

CONSUMER_PATH = "pluginpool.pool.event_batching:WorkerConsumer"
"""For `app.conf.worker_consumer`."""

EVENT_BATCH_CONF = "pluginpool_event_batch_s"
"""The app setting the consumer reads its window from (set by `build_worker_app`)."""


class FlushWindow:
    """When the next publish of buffered events may go: at once after a quiet spell, else
    when the window since the last one ends. Pure, so its rule is tested apart."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._last = float("-inf")

    def due(self, now: float) -> float:
        """The time the buffered events should be published (`now` or later)."""
        return max(now, self._last + self.window_s)

    def flushed(self, now: float) -> None:
        self._last = now


class WorkerConsumer(LazyStrategyConsumer):  # type: ignore[misc]
    """Celery's consumer with lazily built strategies and batched task events."""

    hub: Any  # Celery's, set in its __init__; celery-types declares neither attribute
    event_dispatcher: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._event_window = FlushWindow(float(self.app.conf.get(EVENT_BATCH_CONF) or 0.0))
        self._event_flush_timer: Any = None

    def _flush_events(self) -> None:
        """Called by Celery's hub at the end of a turn in which an event was buffered (and
        by our timer): publish now, or make sure a timer publishes when the window ends.
        Runs on the event loop's thread, so the timer needs no lock."""
        now = time.monotonic()
        due = self._event_window.due(now)
        if due > now and self.hub is not None:
            timer = self._event_flush_timer
            if timer is None or getattr(timer, "canceled", False):
                self._event_flush_timer = self.hub.call_at(due, self._flush_events_due)
            return
        if self._publish_buffered():  # nothing to publish: the window does not restart
            self._event_window.flushed(now)

    def _flush_events_due(self) -> None:
        self._event_flush_timer = None
        self._flush_events()

    def _publish_buffered(self) -> bool:
        """Publish the held events; whether there were any."""
        dispatcher = self.event_dispatcher
        if not dispatcher:
            return False
        held = any(dispatcher._group_buffer.values()) or bool(dispatcher._outbound_buffer)
        dispatcher.flush()
        return held

    def on_close(self) -> None:
        """Before Celery restarts the consumer (a lost broker connection): the events held
        for the window go to the dispatcher's outbound buffer, which Celery carries over to
        the next dispatcher and publishes once connected (it drops the batch buffer). No
        I/O here: the connection is gone."""
        super().on_close()  # first: flushing its pool can still buffer events (a lost child)
        dispatcher = self.event_dispatcher
        if dispatcher is not None:
            with dispatcher.mutex:
                for group, events in dispatcher._group_buffer.items():
                    if events:
                        dispatcher._outbound_buffer.append((list(events), f"{group}.multi"))
                        del events[:]

    def stop(self) -> None:
        """Publish what is held before the consumer's steps stop: its heartbeat step sends
        worker-offline, and an event after it makes Flower and celery's State show the
        worker alive again (as Celery's own events of jobs finishing in the drain do)."""
        with contextlib.suppress(Exception):
            self._publish_buffered()
        super().stop()

    def shutdown(self) -> None:
        """Publish what is still buffered before Celery closes the dispatcher (it does not
        flush on close). Events are best effort: a failure here must not stop the
        shutdown."""
        with contextlib.suppress(Exception):
            self._publish_buffered()
        super().shutdown()
