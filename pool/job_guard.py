"""The worker's look at operator actions around a run: cancelled jobs never run (or end as
cancelled when their run was killed), and a disabled plugin's jobs go back to the queue.

One Redis round trip before each run (the cancel marker and the plugin's pause together).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis
from celery.exceptions import Reject

from pluginpool.policy.errors import JobCancelledError
from pluginpool.policy.keys import RedisKeys
from pluginpool.tasks.pause import Pause

logger = logging.getLogger("pluginpool.execution")

REQUEUE_PAUSE_S = 0.5
"""How long a job of a disabled plugin is held before it goes back to its queue: the worker
stops consuming that queue within this time, so it is not fetched again in a loop."""


def check_before_run(client: redis.Redis, keys: RedisKeys, *, plugin_id: str,
                     job_id: str) -> None:
    """Raise JobCancelledError for a cancelled job; Reject (requeue) one of a disabled
    plugin, which a worker fetched before it heard of the disable."""
    with client.pipeline(transaction=False) as pipe:
        pipe.get(keys.cancelled(job_id))
        pipe.hget(keys.paused, plugin_id)
        cancelled, paused = pipe.execute()
    if cancelled is not None:
        raise JobCancelledError(json.loads(cancelled))
    if paused is not None and Pause.model_validate(json.loads(paused)).mode == "disabled":
        logger.info("plugin %s is disabled: job %s goes back to its queue", plugin_id, job_id)
        time.sleep(REQUEUE_PAUSE_S)
        raise Reject(f"plugin {plugin_id} is disabled", requeue=True)


def cancelled_error(client: redis.Redis, keys: RedisKeys, job_id: str) -> JobCancelledError | None:
    """The job's cancellation, if an operator cancelled it (its run was killed then)."""
    raw: Any = client.get(keys.cancelled(job_id))
    return None if raw is None else JobCancelledError(json.loads(raw))
