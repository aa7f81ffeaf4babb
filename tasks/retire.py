"""Jobs left on an unregistered plugin's queue get a definitive outcome, not silence.

Once a plugin is unregistered no worker consumes its queue, so a job still waiting there
would never end. `fail_queued_jobs` takes every message off the queue (atomic pops: a
worker that claims one first runs it instead, and fails it the same way when the spec is
gone) and stores a `dependency` failure as the job's result, which the producer's
`Job.result()` raises as PluginExecutionError. `unregister` calls it at once; workers call
it for unregistered plugins on every reconciliation, for jobs that arrived late (a submit
racing the unregister, or a dead worker's messages restored to the queue).
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from celery import Celery

from pluginpool.policy.errors import ErrorType, PluginExecutionError

logger = logging.getLogger("pluginpool.retire")

PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
"""kombu's Redis transport keeps one list per priority step: `<queue>`, `<queue>\\x06\\x163`..."""
BATCH = 100


def queue_lists(queue: str) -> list[str]:
    return [queue if pri == 0 else f"{queue}{PRIORITY_SEPARATOR}{pri}" for pri in PRIORITY_STEPS]


def job_id_of(raw: bytes) -> str | None:
    """The task id of a kombu message on a Redis list (Celery message protocol 1 or 2)."""
    try:
        envelope = json.loads(raw)
        headers = envelope.get("headers") or {}
        if headers.get("id"):
            return str(headers["id"])
        body = json.loads(base64.b64decode(envelope["body"]))
        return str(body["id"]) if isinstance(body, dict) and body.get("id") else None
    except (ValueError, KeyError, TypeError):
        return None


def fail_queued_jobs(app: Celery, *, plugin_id: str, queue: str, revision: int) -> int:
    """Fail every job waiting on `queue` with a `dependency` error; returns how many."""
    return sweep_unregistered(app, {plugin_id: (queue, revision)})


def sweep_unregistered(app: Celery, plugins: dict[str, tuple[str, int]]) -> int:
    """`fail_queued_jobs` for several plugins (id → queue, last revision) over one broker
    connection; queues found empty cost one LLEN each."""
    if not plugins:
        return 0
    failed = 0
    with app.connection_for_write() as connection:
        channel: Any = connection.default_channel  # kombu's Redis channel
        client = channel.client
        for plugin_id, (queue, revision) in plugins.items():
            count = 0
            for name in queue_lists(queue):
                while client.llen(name):
                    for raw in client.rpop(name, BATCH) or []:
                        count += _fail_one(app, raw, plugin_id=plugin_id, revision=revision)
            if count:
                logger.info("failed %d queued job(s) of unregistered plugin %s", count,
                            plugin_id)
            failed += count
    return failed


def _fail_one(app: Celery, raw: bytes, *, plugin_id: str, revision: int) -> int:
    job_id = job_id_of(raw)
    if job_id is None:
        logger.warning("dropped an unreadable message from the queue of unregistered plugin"
                       " %s: %r", plugin_id, raw[:200])
        return 0
    error = PluginExecutionError.of(
        ErrorType.DEPENDENCY, "plugin was unregistered before the job ran",
        plugin_id=plugin_id, job_id=job_id, unregistered=True, last_revision=revision)
    app.backend.mark_as_failure(job_id, error)
    return 1
