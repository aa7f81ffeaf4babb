"""The execution task: one Celery task per plugin (`plugin.<id>`), on its own queue.

The task parses the message, resolves the plugin's spec and instance, hands the run to
the worker's runner and returns a JSON envelope `{"value": ..., "meta": {...}}`. Failures
are raised as `PluginExecutionError` so Celery records them (and Flower shows them) as
failures. A pool child that dies mid-run is retried by Celery itself
(`retry_on_worker_lost`), at most `max_restarts` times, `restart_cooldown_ms` apart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

import redis
from celery import Celery, Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.signals import worker_process_init

from pluginpool.policy.breaker import UNGUARDED, Permit
from pluginpool.policy.errors import (
    CircuitOpenError,
    ErrorInfo,
    ErrorType,
    InvalidJobError,
    JobCancelledError,
    PluginExecutionError,
    UnknownInstanceError,
    UnknownPluginError,
)
from pluginpool.policy.storage import InstanceStorage
from pluginpool.pool.job_guard import cancelled_error
from pluginpool.pool.job_request import parse_job
from pluginpool.pool.job_start import start_job
from pluginpool.pool.job_status_hooks import connect_status_signals
from pluginpool.pool.recording import (
    connect_outcome_signals,
    keep_run,
    record_restart,
    record_run,
)
from pluginpool.pool.worker_services import WorkerServices
from pluginpool.tasks.context import PluginContext
from pluginpool.tasks.redis_conn import redis_client
from pluginpool.tasks.result_store import bind_result_store
from pluginpool.tasks.routing import REVISION_HEADER, TRIAL_HEADER
from pluginpool.tasks.runs import without_logs
from pluginpool.tasks.spec import PluginSpec

logger = logging.getLogger("pluginpool.execution")


def bind_worker_app(app: Celery, services: WorkerServices) -> None:
    """What a worker app needs of its services, done once by the worker that builds it:
    each pool child renews its Redis pool after the fork, the result backend stores final
    statuses, the run log and the outcome record with each result, and the signals that
    record what only Celery's main process sees are connected for this app (never as an
    import side effect)."""
    worker_process_init.connect(_renew_redis_pool(services), weak=False)
    worker_process_init.connect(_sweep_orphaned_zygotes(services), weak=False)
    settings = services.settings
    bind_result_store(app.backend, settings.keys, ttl_s=settings.result_expires_s,
                      result_backend=settings.effective_result_backend,
                      redis_url=settings.redis_url)
    connect_outcome_signals(app, services)
    connect_status_signals(app, services)


SWEEP_ROUNDS = 3
"""Sweeps a new pool process makes: the first, and after the grace of orphans still
running (the housekeeper, which sweeps each minute, starts only with sandboxed jobs)."""


def _sweep_orphaned_zygotes(services: WorkerServices) -> Callable[..., None]:
    """Each new pool process sweeps what one that died left stopped or hung (owners.py)
    at once (its own housekeeper starts only with its first sandboxed job), in a thread:
    Celery kills a pool process not up within 4 s, and removing homes takes what it takes.
    A pool process never forks (zygotes start through exec), so a thread is safe here."""
    def sweep() -> None:
        from pluginpool.pool.sandbox import owners
        from pluginpool.pool.sandbox.runner import warm_root_of
        try:
            for _round in range(SWEEP_ROUNDS):  # again after the grace of running orphans
                swept = owners.sweep(warm_root_of(services.settings))
                if not swept.waiting or _round == SWEEP_ROUNDS - 1:
                    break
                time.sleep(owners.TEARDOWN_GRACE_S + 1)
        except Exception:
            logger.exception("sweeping orphaned zygotes failed")

    def start(**_: Any) -> None:
        threading.Thread(target=sweep, name="pluginpool-zygote-sweep", daemon=True).start()
    return start


def _renew_redis_pool(services: WorkerServices) -> Callable[..., None]:
    """Each pool child gets a connection pool of its own, made after the fork. The
    inherited one may have been locked by a thread of the worker's main process (the
    heartbeat, the registry follower) at the instant of the fork, and redis-py's reset
    after a fork takes that lock: the child's first Redis call would wait forever."""
    def renew(**_: Any) -> None:
        services.redis.connection_pool = redis_client(services.settings).connection_pool
    return renew


class PluginTask(Task[Any, Any]):
    """Base of every `plugin.<id>` task; per-plugin options are class attributes."""

    plugin_id: str = ""
    services: WorkerServices
    """Bound when the task is registered (`register_plugin_task`): a task knows its worker's
    services without looking them up on the app."""
    typing = False  # arguments are validated by parse_job, with a clear error
    # Expected failures: logged without a traceback, recorded as failures all the same.
    throws = (PluginExecutionError, InvalidJobError, CircuitOpenError, JobCancelledError)


def _header(task: Task[Any, Any], name: str) -> Any:
    request = task.request
    value = getattr(request, name, None)
    headers = getattr(request, "headers", None)
    if value is None and isinstance(headers, dict):
        value = headers.get(name)
    return value


def run_plugin_job(task: PluginTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The body of every plugin task.

    If pluginpool's own Redis fails while the job is being prepared (Redis restarting, a
    failover), the job is not failed: it goes back to its queue (Reject with requeue) and
    runs when Redis is back. Redis failures after the run only cost its bookkeeping."""
    try:
        return _run_plugin_job(task, args, kwargs)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        logger.warning("Redis unavailable while preparing %s[%s]; requeued: %s", task.name,
                       task.request.id, exc)
        raise Reject(f"Redis unavailable: {exc}", requeue=True) from exc
    except SoftTimeLimitExceeded:
        # The cancel listener's signal can land outside the run (its bookkeeping).
        cancelled = cancelled_error(task.services.redis, task.services.settings.keys,
                                    str(task.request.id))
        if cancelled is not None:
            raise cancelled from None
        raise


def _run_plugin_job(task: PluginTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    services = task.services
    job_id = str(task.request.id)
    plugin_id = task.plugin_id
    attempt = int(task.request.retries or 0) + 1
    # Cancelled? Disabled? Else `started`: one round trip (pool/job_start.py).
    start_job(services.redis, services.settings.keys, plugin_id=plugin_id, job_id=job_id,
              worker=task.request.hostname, attempt=attempt,
              ttl_s=services.settings.result_expires_s)
    try:
        job = parse_job(args, kwargs, max_depth=services.settings.max_payload_depth)
    except InvalidJobError as exc:
        logger.warning("rejecting job %s on plugin %s: %s", job_id, plugin_id, exc)
        raise
    revision = _header(task, REVISION_HEADER)
    try:
        spec = services.specs.get(plugin_id, min_revision=int(revision or 0))
    except UnknownPluginError:
        raise PluginExecutionError.of(
            ErrorType.DEPENDENCY, "plugin is not registered (any more)",
            plugin_id=plugin_id, job_id=job_id) from None
    if not spec.offers(job.operation):
        raise InvalidJobError(f"plugin {plugin_id} has no operation {job.operation[:100]!r}; "
                              f"it has {', '.join(spec.operations)}")
    initial_data: dict[str, Any] = {}
    if job.instance_id is not None:
        try:
            instance = services.instances.get(job.instance_id)
        except UnknownInstanceError:
            raise PluginExecutionError.of(
                ErrorType.RUNTIME, f"plugin instance {job.instance_id[:100]!r} does not exist: "
                "unloaded before the job ran, or never loaded (a producer of ours refuses "
                "an unknown one at submit)",
                plugin_id=plugin_id, instance_id=job.instance_id, job_id=job_id) from None
        if instance.plugin_id != plugin_id:
            raise InvalidJobError(
                f"instance {job.instance_id} belongs to {instance.plugin_id}, not {plugin_id}")
        initial_data = instance.initial_data
    permit = _admit(services, spec, token=int(_header(task, TRIAL_HEADER) or 0), job_id=job_id)
    ctx = PluginContext(plugin_id=plugin_id, job_id=job_id, instance_id=job.instance_id,
                        attempt=attempt, limits=spec.resource_limits,
                        permissions=spec.permissions, initial_data=initial_data,
                        operation=job.operation, worker=task.request.hostname,
                        workspace_root=services.settings.workspace_root,
                        storage_factory=lambda: InstanceStorage(
                            services.redis, services.settings.keys,
                            job.instance_id or f"plugin:{plugin_id}",
                            quota_bytes=spec.resource_limits.max_storage_kb * 1024))
    started = time.perf_counter()
    try:
        report = services.runner_for(spec).run(spec, ctx, job.payload)
    except PluginExecutionError as exc:
        cancelled = cancelled_error(services.redis, services.settings.keys, job_id)
        if cancelled is not None:  # an operator cancelled it: its run was killed
            raise cancelled from None
        info = exc.info
        info.plugin_id, info.instance_id, info.job_id = plugin_id, job.instance_id, job_id
        info.details.setdefault("attempt", attempt)
        if info.details.pop("restartable", False):
            _restart_or_give_up(task, spec, info)
        record_run(task, services, spec, info, usage=info.details.get("usage", {}),
                   duration_ms=(time.perf_counter() - started) * 1000,
                   generation=permit.generation, instance_id=job.instance_id)
        if job.instance_id is not None and not spec.isolation.error_recovery:
            services.instances.mark_failed(job.instance_id, info.model_dump(mode="json"))
        error = PluginExecutionError(info)
        keep_run(task, services, plugin_id, job_id=job_id, ok=False,
                 duration_ms=(time.perf_counter() - started) * 1000,
                 error=without_logs(error.info.model_dump(mode="json")),
                 logs=str(info.details.get("logs", "")), instance_id=job.instance_id)
        raise error from None
    duration_ms = (time.perf_counter() - started) * 1000
    record_run(task, services, spec, None, usage=report.usage, duration_ms=duration_ms,
               generation=permit.generation, instance_id=job.instance_id)
    keep_run(task, services, plugin_id, job_id=job_id, ok=True, duration_ms=duration_ms,
             error=None, logs=report.logs, instance_id=job.instance_id)
    return {
        "value": report.value,
        "meta": {
            "plugin_id": plugin_id,
            "instance_id": job.instance_id,
            "operation": job.operation,
            "revision": spec.revision,
            "attempt": attempt,
            "worker": task.request.hostname,
            "duration_ms": round(duration_ms, 3),
            "usage": report.usage,
            "logs": report.logs,
        },
    }


def _restart_or_give_up(task: PluginTask, spec: PluginSpec, info: ErrorInfo) -> None:
    """A run whose process died (or was killed for memory or storage) is run again after the
    cooldown, as a Celery retry of the same job, until max_restarts; then it fails."""
    isolation = spec.isolation
    restarts = int(task.request.retries or 0)
    if isolation.auto_restart and restarts < isolation.max_restarts:
        record_restart(task.services, spec.id)
        logger.warning("restarting %s[%s] in %d ms: %s", task.name, task.request.id,
                       isolation.restart_cooldown_ms, info.message)
        raise task.retry(countdown=isolation.restart_cooldown_ms / 1000,
                         max_retries=isolation.max_restarts)
    info.details["restarts_exhausted"] = True
    info.details["max_restarts"] = isolation.max_restarts if isolation.auto_restart else 0


def _admit(services: WorkerServices, spec: PluginSpec, *, token: int, job_id: str) -> Permit:
    """The breaker's second look: a backlog queued before it opened fails fast here."""
    if not services.settings.breaker_enabled:
        return UNGUARDED
    permit = services.gate.admit(spec, token=token)
    if not permit.allowed:
        raise CircuitOpenError.of(spec.id, state=permit.state,
                                  retry_after_ms=permit.retry_after_ms, job_id=job_id)
    return permit


def register_plugin_task(app: Celery, spec: PluginSpec, services: WorkerServices
                         ) -> PluginTask:
    """Register `plugin.<id>` with the plugin's restart policy and default time limits,
    bound to the worker's services."""
    isolation = spec.isolation
    deadlines = spec.deadlines

    def run(self: PluginTask, *args: Any, **kwargs: Any) -> Any:
        return run_plugin_job(self, args, kwargs)

    options: dict[str, Any] = {
        "base": PluginTask,
        "bind": True,
        "name": spec.task_name,
        "plugin_id": spec.id,
        "services": services,
        "acks_late": True,
        "reject_on_worker_lost": True,
        # Celery retries a job whose pool child died, bounded by max_retries, with
        # default_retry_delay between attempts; then it records WorkerLostError.
        "retry_on_worker_lost": True,
        "max_retries": isolation.max_restarts if isolation.auto_restart else 0,
        "default_retry_delay": isolation.restart_cooldown_ms / 1000,
        "soft_time_limit": deadlines.celery_soft_s,
        "time_limit": deadlines.celery_hard_s,
    }
    return cast(PluginTask, app.task(**options)(run))


def register_plugin_tasks(app: Celery, specs: Iterable[PluginSpec],
                          services: WorkerServices) -> list[str]:
    return [register_plugin_task(app, spec, services).name for spec in specs]
