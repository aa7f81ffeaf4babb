"""The worker's one round trip before a run: the operator's word on the job and its plugin,
and the job's `started` status, in one Lua step (`job_start.lua`).

A cancelled job never runs (JobCancelledError); a job of a disabled plugin, fetched before
its worker heard of the disable, goes back to its queue (Reject with requeue, after
`REQUEUE_PAUSE_S`); any other job is recorded as `started` and pushed to its watchers.
This replaces the cancel/pause pipeline (pool/job_guard.py) and the `started` write of a
signal hook: one round trip instead of two.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import redis
from celery.exceptions import Reject
from redis.exceptions import NoScriptError

from pluginpool.policy.errors import JobCancelledError
from pluginpool.policy.keys import RedisKeys
from pluginpool.pool.job_guard import REQUEUE_PAUSE_S
from pluginpool.tasks.job_status import LIB_SOURCE, encode_change

logger = logging.getLogger("pluginpool.execution")

SOURCE = LIB_SOURCE + Path(__file__).with_name("job_start.lua").read_text()
SHA = hashlib.sha1(SOURCE.encode()).hexdigest()


def start_job(client: redis.Redis, keys: RedisKeys, *, plugin_id: str, job_id: str,
              worker: str | None, attempt: int, ttl_s: int) -> None:
    """Raise JobCancelledError for a cancelled job, Reject (requeue) one of a disabled
    plugin; otherwise record the job as `started` (its attempt and worker with it)."""
    change = encode_change(job_id, plugin_id=plugin_id, worker=worker, attempt=attempt)
    script_keys = [keys.cancelled(job_id), keys.paused, keys.job_status(job_id),
                   keys.job_channel(job_id)]
    try:
        reply: Any = client.evalsha(SHA, len(script_keys), *script_keys, plugin_id, change,
                                    ttl_s)
    except NoScriptError:  # Redis restarted or its script cache was flushed
        reply = client.eval(SOURCE, len(script_keys), *script_keys, plugin_id, change, ttl_s)
    cancelled, paused = reply
    if cancelled is not None:
        raise JobCancelledError(json.loads(cancelled))
    if paused is not None and json.loads(paused).get("mode") == "disabled":
        logger.info("plugin %s is disabled: job %s goes back to its queue", plugin_id, job_id)
        time.sleep(REQUEUE_PAUSE_S)
        raise Reject(f"plugin {plugin_id} is disabled", requeue=True)
