"""Consuming Celery's task and worker events for what is live: runs in progress, workers
going offline. The figures that must not be lost are not kept here (workers write them to
Redis with every outcome), so a restarted or second aggregator reports the same counts.

Memory is bounded by the plugins and workers, plus the runs in flight (capped).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from typing import Any

import redis
from celery import Celery

from pluginpool.policy.keys import RedisKeys
from pluginpool.tasks.routing import plugin_of_task

logger = logging.getLogger("pluginpool.aggregator")

MAX_IN_FLIGHT = 100_000
FINISHED = {"task-succeeded", "task-failed", "task-rejected", "task-revoked", "task-retried"}


class EventMonitor(threading.Thread):
    def __init__(self, app: Celery, client: redis.Redis, keys: RedisKeys) -> None:
        super().__init__(name="pluginpool-events", daemon=True)
        self._app = app
        self._redis = client
        self._keys = keys
        self._receiver: Any = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: OrderedDict[str, str] = OrderedDict()
        self.events_seen = 0
        self.by_type: Counter[str] = Counter()
        self.workers_seen: dict[str, float] = {}
        self.worker_load: dict[str, dict[str, Any]] = {}
        """Worker node → its last heartbeat's load (active jobs, processed, loadavg)."""
        self.connected = threading.Event()

    def running_by_plugin(self) -> Counter[str]:
        with self._lock:
            return Counter(self._in_flight.values())

    def on_event(self, event: dict[str, Any]) -> None:
        kind = str(event.get("type", ""))
        with self._lock:
            self.events_seen += 1
            self.by_type[kind] += 1
            uuid = event.get("uuid")
            if kind == "task-received" and uuid:
                plugin_id = plugin_of_task(str(event.get("name", "")))
                if plugin_id is not None:
                    self._in_flight[uuid] = plugin_id
                    while len(self._in_flight) > MAX_IN_FLIGHT:
                        self._in_flight.popitem(last=False)
            elif kind in FINISHED and uuid:
                self._in_flight.pop(uuid, None)
            elif kind in ("worker-heartbeat", "worker-online"):
                self.workers_seen[str(event.get("hostname"))] = time.time()
                self.worker_load[str(event.get("hostname"))] = {
                    "active": event.get("active"), "processed": event.get("processed"),
                    "loadavg": event.get("loadavg"), "freq_s": event.get("freq")}
        if kind == "worker-offline":
            hostname = str(event.get("hostname"))
            with self._lock:
                self.workers_seen.pop(hostname, None)
                self.worker_load.pop(hostname, None)
            try:
                self._redis.hdel(self._keys.workers, hostname)
                self._redis.hdel(self._keys.worker_queues, hostname)
            except redis.RedisError as exc:
                logger.warning("could not remove offline worker %s: %s", hostname, exc)

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                with self._app.connection() as connection:
                    self._receiver = self._app.events.Receiver(
                        connection, handlers={"*": self.on_event})
                    self.connected.set()
                    self._receiver.capture(limit=None, timeout=None, wakeup=True)
            except Exception as exc:  # the broker went away: reconnect, keep serving HTTP
                self.connected.clear()
                if not self._stopping.is_set():
                    logger.warning("event stream lost (%r); reconnecting", exc)
                    time.sleep(1)

    def stop(self) -> None:
        self._stopping.set()
        if self._receiver is not None:
            self._receiver.should_stop = True
