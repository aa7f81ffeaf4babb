"""Each worker records, every few seconds, that it is alive and which queues it consumes.

A Celery bootstep in the worker's main process. The health view counts a worker as live
while its last heartbeat is recent, so "no live worker consumes this queue" is known
without the aggregator; the aggregator also removes a worker at once when Celery reports
it offline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from typing import Any

import redis
from celery import bootsteps

logger = logging.getLogger("pluginpool.liveness")


class WorkerLiveness(bootsteps.StartStopStep):  # type: ignore[misc]
    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._timer_entry: Any = None

    def start(self, worker: Any) -> None:
        services = worker.app.pluginpool_services
        self._key = services.settings.keys.workers
        self._redis: redis.Redis = services.redis
        self._node = worker.hostname
        self._app = worker.app
        self._beat()
        self._timer_entry = worker.timer.call_repeatedly(
            services.settings.worker_heartbeat_s, self._beat)

    def _beat(self) -> None:
        # Read at every beat: the registry follower adds and cancels queues (fleet.py).
        queues = self._app.amqp.queues
        entry = {"queues": sorted(queues.consume_from or queues), "at": time.time(),
                 "pid": os.getpid(),
                 "host": socket.gethostname()}
        try:
            self._redis.hset(self._key, self._node, json.dumps(entry))
        except redis.RedisError as exc:
            logger.warning("could not record this worker's heartbeat: %s", exc)

    def stop(self, worker: Any) -> None:
        if self._timer_entry is not None:
            self._timer_entry.cancel()
        with contextlib.suppress(redis.RedisError, AttributeError):
            self._redis.hdel(self._key, self._node)
