"""A job the poison rule quarantines gets an outcome: its failure, stored for its producer.

`claim.lua` moves a message delivered `max_deliveries` times without an outcome (its worker
died each time) to the dead-letter store instead of delivering it again. The store keeps it
for an operator to requeue once the cause is fixed, but the producer waiting on the job
would otherwise wait forever. The worker that quarantined it (its transport calls this
hook, `reliable_fetch.QUARANTINE_HOOK_OPTION`) stores a `runtime` failure as the job's
result, as `tasks/retire.py` does for jobs of an unregistered plugin; a requeued job that
then runs replaces it with its new outcome.
"""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery

from pluginpool.policy.errors import DeadLetterNotFoundError, ErrorType, PluginExecutionError
from pluginpool.pool.stored_outcome import has_outcome
from pluginpool.pool.worker_services import WorkerServices
from pluginpool.tasks.deadletter import DeadLetterStore, queue_of_list
from pluginpool.tasks.retire import job_id_of
from pluginpool.tasks.routing import PLUGIN_QUEUE_PREFIX


def fail_quarantined(app: Celery, services: WorkerServices) -> Callable[[str], None]:
    """The hook: fail the job of the quarantined message with this dead letter's id."""
    store = DeadLetterStore(services.redis, services.settings.keys)

    def fail(entry_id: str) -> None:
        try:
            entry = store.get(entry_id)
        except DeadLetterNotFoundError:
            return  # requeued or discarded by an operator meanwhile: nothing is owed
        job_id = job_id_of(entry.raw.encode())
        if job_id is None:
            return  # not a task message: nobody waits for it
        if has_outcome(app, job_id):
            return  # an earlier delivery's run stored an outcome before its worker died
        queue = queue_of_list(entry.queue or "")
        plugin_id = queue.rsplit(PLUGIN_QUEUE_PREFIX, 1)[-1] if PLUGIN_QUEUE_PREFIX in queue \
            else None
        error = PluginExecutionError.of(
            ErrorType.RUNTIME,
            f"quarantined by the poison rule: delivered {entry.deliveries} times and its "
            "worker died each time; kept as a dead letter an operator can requeue",
            plugin_id=plugin_id, job_id=job_id, quarantined=True,
            deliveries=entry.deliveries, dead_letter_id=entry.id)
        app.backend.mark_as_failure(job_id, error)

    return fail
