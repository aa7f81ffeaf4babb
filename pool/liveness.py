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

from pluginpool.pool.worker_services import WorkerServices
from pluginpool.tasks.health import queues_digest

logger = logging.getLogger("pluginpool.liveness")


class WorkerLiveness(bootsteps.StartStopStep):  # type: ignore[misc]
    requires = ("celery.worker.components:Timer",)
    services: WorkerServices  # bound by the worker (`bound_step`)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._timer_entry: Any = None

    def start(self, worker: Any) -> None:
        services = self.services
        self._key = services.settings.keys.workers
        self._queues_key = services.settings.keys.worker_queues
        self._written_digest = ""
        self._redis: redis.Redis = services.redis
        self._node = worker.hostname
        self._app = worker.app
        self._beat()
        self._timer_entry = worker.timer.call_repeatedly(
            services.settings.worker_heartbeat_s, self._beat)

    def _beat(self) -> None:
        # Read at every beat: the registry follower adds and cancels queues (fleet.py).
        queues = self._app.amqp.queues
        names = sorted(queues.consume_from or queues)
        digest = queues_digest(names)
        entry = {"queues_digest": digest, "queue_count": len(names), "at": time.time(),
                 "pid": os.getpid(), "host": socket.gethostname()}
        try:
            with self._redis.pipeline(transaction=True) as pipe:
                if digest != self._written_digest:  # the list only when it changed
                    pipe.hset(self._queues_key, self._node, json.dumps(names))
                pipe.hset(self._key, self._node, json.dumps(entry))
                pipe.execute()
            self._written_digest = digest
        except redis.RedisError as exc:
            logger.warning("could not record this worker's heartbeat: %s", exc)

    def stop(self, worker: Any) -> None:
        if self._timer_entry is not None:
            self._timer_entry.cancel()
        with contextlib.suppress(redis.RedisError, AttributeError):
            self._redis.hdel(self._key, self._node)
            self._redis.hdel(self._queues_key, self._node)
