"""A cancelled job's run is killed within a second, on whichever worker runs it.

A Celery bootstep in the worker's main process: one thread listens for cancelled job ids
(`keys.cancel_channel`) and sends SIGUSR1 (billiard's soft time limit signal) to the pool
process running that job. There the run is stopped as at its soft limit (a sandbox's
supervisor kills the run's process group; an in-process run gets SoftTimeLimitExceeded),
and the task, finding the job's cancel marker, ends it as JobCancelledError
(pool/job_guard.py). Jobs not yet started never run: the task checks the marker first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Any

import redis
from celery.worker import state as worker_state

from pluginpool.pool.thread_step import ThreadStep

logger = logging.getLogger("pluginpool.cancel")


def _running(job_id: str) -> Any:
    """The request of `job_id` if this worker runs it now (the set changes under us)."""
    for _ in range(3):
        try:
            return next((r for r in list(worker_state.active_requests) if r.id == job_id),
                        None)
        except RuntimeError:
            continue
    return None


class CancelListener(ThreadStep):
    thread_name = "pluginpool-cancel"

    def setup(self, worker: Any) -> None:
        services = self.services
        self._redis: redis.Redis = services.redis
        self._channel = services.settings.keys.cancel_channel

    def run(self) -> None:
        pubsub: Any = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self._redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                    pubsub.subscribe(self._channel)
                message = pubsub.get_message(timeout=0.5)
                if message:
                    self.kill(str(message["data"]))
            except redis.RedisError as exc:
                logger.warning("cancel listener: Redis unavailable, retrying: %s", exc)
                if pubsub is not None:
                    with contextlib.suppress(redis.RedisError):
                        pubsub.close()
                pubsub = None
                self._stop.wait(1.0)
        if pubsub is not None:
            with contextlib.suppress(redis.RedisError):
                pubsub.close()

    @staticmethod
    def kill(job_id: str) -> bool:
        request = _running(job_id)
        pid = getattr(request, "worker_pid", None)
        if not pid:
            return False
        logger.warning("job %s was cancelled: stopping its run in pool process %d", job_id,
                       pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
        return True
