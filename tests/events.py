"""Hearing Celery's events in a test: Celery's own receiver, on a thread."""

from __future__ import annotations

import threading
import time
from typing import Any

from celery.events.receiver import EventReceiver

from pluginpool.pool.tools.processes import wait_until
from pluginpool.tasks.client import PluginClient


class CountingReceiver(EventReceiver):  # type: ignore[misc]
    """Celery's receiver, also counting the batches (`task.multi` messages, a list of
    events each) that a worker's buffered task events came in."""

    batches = 0

    def _receive(self, body: Any, message: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(body, list):
            type(self).batches += 1
        super()._receive(body, message, *args, **kwargs)


class Events:
    """Every event published on the app's broker, heard from a thread until `close`."""

    def __init__(self, client: PluginClient) -> None:
        self.seen: list[dict[str, Any]] = []
        self._connection = client.app.connection_for_read()
        CountingReceiver.batches = 0
        self._receiver = CountingReceiver(self._connection, app=client.app,
                                          handlers={"*": self.seen.append})
        self._thread = threading.Thread(target=self._receiver.capture, daemon=True,
                                        kwargs={"limit": None, "timeout": None,
                                                "wakeup": False})
        self._thread.start()

    def listening(self) -> bool:
        """Wait until the receiver hears a probe event (events published before it has
        subscribed are lost: Redis pub/sub)."""
        app = self._receiver.app
        with app.connection_for_write() as connection:
            probe = app.events.Dispatcher(connection, enabled=True)

            def heard() -> bool:
                probe.send("test-probe")
                time.sleep(0.05)
                return any(e.get("type") == "test-probe" for e in list(self.seen))

            try:
                return wait_until(heard, timeout_s=10)
            finally:
                probe.close()

    def of(self, kind: str, job_ids: set[str]) -> set[str]:
        return {e["uuid"] for e in list(self.seen)
                if e.get("type") == kind and e.get("uuid") in job_ids}

    def close(self) -> None:
        self._receiver.should_stop = True
        self._thread.join(10)
        self._connection.release()
