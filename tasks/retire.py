"""Jobs left on an unregistered plugin's queue get a definitive outcome, not silence.

Once a plugin is unregistered no worker consumes its queue, so a job still waiting there
would never end. `fail_queued_jobs` stores a `dependency` failure as the result of every job
on the queue, which the producer's `Job.result()` raises as PluginExecutionError (a worker
that claims one first runs it instead, and fails it the same way when the spec is gone).
`unregister` calls it at once; workers call it for unregistered plugins on every
reconciliation, for jobs that arrived late (a submit racing the unregister, or a dead
worker's messages restored to the queue).

No job is lost on the way: `retire.lua` moves jobs from the queue lists to the plugin's
holding list in one atomic step, and a job leaves the holding list only once its failure
is stored, so a sweeper killed in between leaves it to the next sweep. One script call
covers up to `PLUGINS_PER_CALL` plugins, so the workers' periodic sweep over every plugin
ever unregistered costs one round trip, not four per plugin. A message that is not a
Celery job of ours is set aside in the dead-letter store with the reason, not dropped.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from celery import Celery

from pluginpool.policy.errors import ErrorType, PluginExecutionError
from pluginpool.tasks.deadletter import PRIORITY_SEPARATOR
from pluginpool.tasks.delivery_record import RETIRE, run_script, unprefixed_in_pipe

logger = logging.getLogger("pluginpool.retire")

PRIORITY_STEPS = (0, 3, 6, 9)
"""kombu's Redis transport keeps one list per priority step: `<queue>`, `<queue>\\x06\\x163`..."""
BATCH = 100
"""Most jobs one plugin's holding list takes at a time."""
PLUGINS_PER_CALL = 200
MAX_ROUNDS = 100_000
"""A bound on one sweep's rounds (each fails up to BATCH jobs per plugin), never reached
unless something keeps refilling a holding list."""


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


def holding_list(queue: str) -> str:
    """Where a sweep holds a plugin's jobs until their failures are stored (`\\x06\\x16`,
    kombu's priority separator, cannot occur in a plugin id)."""
    return f"{queue}{PRIORITY_SEPARATOR}retiring"


def sweep_unregistered(app: Celery, plugins: dict[str, tuple[str, int]]) -> int:
    """`fail_queued_jobs` for several plugins (id → queue, last revision) over one broker
    connection and one script call per `PLUGINS_PER_CALL` plugins; returns how many."""
    if not plugins:
        return 0
    failed = 0
    with app.connection_for_write() as connection:
        channel: Any = connection.default_channel  # kombu's Redis channel
        items = list(plugins.items())
        for start in range(0, len(items), PLUGINS_PER_CALL):
            failed += _sweep(app, channel, dict(items[start:start + PLUGINS_PER_CALL]))
    return failed


def _sweep(app: Celery, channel: Any, plugins: dict[str, tuple[str, int]]) -> int:
    client = channel.client
    prefix = getattr(channel, "global_keyprefix", "") or ""
    counts = dict.fromkeys(plugins, 0)
    pending = dict(plugins)
    for _ in range(MAX_ROUNDS):
        if not pending:
            break
        keys = [prefix + name for queue, _ in pending.values()
                for name in (*queue_lists(queue), holding_list(queue))]
        held_lists = run_script(client, RETIRE, keys, [len(PRIORITY_STEPS) + 1, BATCH])
        still: dict[str, tuple[str, int]] = {}
        for (plugin_id, (queue, revision)), held in zip(pending.items(), held_lists,
                                                        strict=True):
            if not held:
                continue
            for raw in held:
                counts[plugin_id] += _fail_one(app, channel, raw, plugin_id=plugin_id,
                                               queue=queue, revision=revision)
            with client.pipeline(transaction=False) as pipe:
                for raw in held:
                    unprefixed_in_pipe(pipe, "LREM", prefix + holding_list(queue), 1, raw)
                pipe.execute()
            still[plugin_id] = (queue, revision)
        pending = still
    for plugin_id, count in counts.items():
        if count:
            logger.info("failed %d queued job(s) of unregistered plugin %s", count, plugin_id)
    return sum(counts.values())


def _fail_one(app: Celery, channel: Any, raw: bytes, *, plugin_id: str, queue: str,
              revision: int) -> int:
    job_id = job_id_of(raw)
    if job_id is None:
        reason = f"not a job: on the queue of unregistered plugin {plugin_id}"
        set_aside = getattr(channel, "set_aside", None)  # pluginpool's transport
        if set_aside is not None:
            set_aside(raw, reason=reason, queue=queue)
        else:
            logger.warning("dropped a message that is not a job: %s: %r", reason, raw[:200])
        return 0
    error = PluginExecutionError.of(
        ErrorType.DEPENDENCY, "plugin was unregistered before the job ran",
        plugin_id=plugin_id, job_id=job_id, unregistered=True, last_revision=revision)
    app.backend.mark_as_failure(job_id, error)
    return 1
