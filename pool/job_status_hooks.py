"""The worker's side of job statuses that ride on no other round trip: Celery's signals, in
the process that sees each change.

- `started` is written by the pre-run check (pool/job_start.py), not here;
- `retrying`: task_retry, in the pool process (a restart after the run's process died) or in
  the main process (Celery's own retry of a job whose pool process died);
- `succeeded` / `failed` / `cancelled`: written in the same MULTI as Celery's result
  (tasks/result_store.py) when the result backend is pluginpool's Redis database; only
  otherwise here: task_postrun in the pool process, which Celery sends after it stored the
  result, and task_failure in the main process for what the pool process could not report
  (hard time limit, restarts exhausted), also after the result is stored.

A status that cannot be written (Redis away) is logged; the job itself is never failed by it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import redis
from billiard.exceptions import WorkerLostError
from celery import Celery, states
from celery.exceptions import TimeLimitExceeded
from celery.signals import task_failure, task_postrun, task_retry

from pluginpool.policy.errors import PluginExecutionError
from pluginpool.tasks.job_status import JobStatus, JobStatusStore
from pluginpool.tasks.result_store import writes_final_statuses
from pluginpool.tasks.routing import plugin_of_task

if TYPE_CHECKING:
    from pluginpool.pool.worker_services import WorkerServices

logger = logging.getLogger("pluginpool.job_status")


def connect_status_signals(app: Celery, services: WorkerServices) -> None:
    """Connect the status writes above for this app's plugin tasks; done by the worker
    that builds the app (`bind_worker_app`), never as an import side effect."""
    store = JobStatusStore(services.redis, services.settings.keys,
                           ttl_s=services.settings.result_expires_s)

    def write(sender: Any, job_id: Any, status: JobStatus, **fields: Any) -> None:
        plugin_id = plugin_of_task(str(getattr(sender, "name", "")))
        if plugin_id is None or getattr(sender, "app", None) is not app or not job_id:
            return
        try:
            store.set(str(job_id), status, plugin_id=plugin_id, **fields)
        except redis.RedisError as exc:
            logger.warning("could not record status %s of job %s: %s", status, job_id, exc)

    def on_retry(sender: Any = None, request: Any = None, reason: Any = None,
                 **_: Any) -> None:
        write(sender, getattr(request, "id", None), "retrying", reason=str(reason)[:500])

    def on_postrun(sender: Any = None, task_id: Any = None, state: Any = None,
                   retval: Any = None, **_: Any) -> None:
        if writes_final_statuses(getattr(sender, "backend", None)):
            return  # written with the result
        if state == states.SUCCESS:
            write(sender, task_id, "succeeded")
        elif state == states.FAILURE and type(retval).__name__ == "JobCancelledError":
            write(sender, task_id, "cancelled")  # usually recorded already, by the canceller
        elif state == states.FAILURE:
            error_type = retval.type if isinstance(retval, PluginExecutionError) else None
            write(sender, task_id, "failed", error_type=error_type,
                  error=type(retval).__name__)

    def on_failure_in_main_process(sender: Any = None, task_id: Any = None,
                                   exception: BaseException | None = None,
                                   **_: Any) -> None:
        if writes_final_statuses(getattr(sender, "backend", None)):
            return  # written with the result
        if isinstance(exception, TimeLimitExceeded | WorkerLostError):
            write(sender, task_id, "failed", error=type(exception).__name__,
                  error_type="timeout" if isinstance(exception, TimeLimitExceeded)
                  else "runtime")

    task_retry.connect(on_retry, weak=False)
    task_postrun.connect(on_postrun, weak=False)
    task_failure.connect(on_failure_in_main_process, weak=False)
