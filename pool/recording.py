"""What happens after a run: its outcome recorded where producers, operators and the
health aggregator read it.

- the breaker's window, the health figures, the `on_error` event and a custom Celery event
  `task-plugin-usage` with the run's usage (for the aggregator): one script call
  (breaker.lua; the event is encoded here and published by the script, tasks/event_encoder.py);
- for runs of an instance, its usage totals, last run and recent errors (`sandbox_info`);
- the run in the plugin's recent runs, with its logs (`keep_run`).

All of it travels in the MULTI that stores the job's result (tasks/result_store.py), with the
job's final status: no round trip of its own, and all or nothing with the result. Where the
result backend is not pluginpool's Redis database, the script call and the rest are sent
as they were (a round trip each).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import redis
from billiard.exceptions import WorkerLostError
from celery import Celery, Task
from celery.exceptions import TimeLimitExceeded
from celery.signals import task_failure, task_retry
from redis.exceptions import NoScriptError

from pluginpool.policy.breaker import CircuitBreaker
from pluginpool.policy.errors import ErrorInfo, ErrorType, UnknownPluginError
from pluginpool.tasks import instance_usage
from pluginpool.tasks.event_encoder import Encoded, EventEncoder, same_server
from pluginpool.tasks.outcome import error_for_failure
from pluginpool.tasks.result_store import JobResultBackend
from pluginpool.tasks.routing import plugin_of_task
from pluginpool.tasks.run_logs import forward
from pluginpool.tasks.runs import RecentRuns, after_run
from pluginpool.tasks.spec import PluginSpec

if TYPE_CHECKING:
    from pluginpool.pool.worker_services import WorkerServices

logger = logging.getLogger("pluginpool.recording")

USAGE_EVENT = "task-plugin-usage"
RECENT_ERRORS = 20
SUMMED_USAGE = ("cpu_ms", "wall_ms", "network_requests")
HEALTH_FIGURES = {"cpu_ms": "cpu_ms", "cpu_percent": "cpu_percent",
                  "memory_mb": "peak_memory_mb", "network_requests": "network_requests",
                  "storage_kb": "storage_kb"}
"""Health figure → the usage field it comes from."""


def record_run(task: Task[Any, Any] | None, services: WorkerServices, spec: PluginSpec,
               error: ErrorInfo | None, *, usage: dict[str, Any], duration_ms: float,
               generation: int, instance_id: str | None) -> None:
    """Record one finished run (success or final failure) everywhere it is read."""
    event: dict[str, Any] | None = None
    notify = None
    if task is not None and services.settings.usage_events and task.request.hostname:
        event = {"uuid": task.request.id, "plugin_id": spec.id, "instance_id": instance_id,
                 "job_id": task.request.id, "error_type": str(error.type) if error else None,
                 "usage": usage}
        settings = services.settings
        if same_server(settings.effective_broker_url, settings.redis_url):
            notify = services.usage_events.encode(task, **event)
    if task is not None and _record_with_result(task, services, spec, error, usage=usage,
                                                duration_ms=duration_ms, generation=generation,
                                                instance_id=instance_id, event=event,
                                                notify=notify):
        return
    recorded = _record_outcome(services, spec, error, duration_ms=duration_ms,
                               generation=generation, usage=usage, notify=notify)
    if task is not None and event is not None and (notify is None or not recorded):
        services.usage_events.send(task, **event)
    if instance_id is not None:
        _record_instance(services, instance_id, error, usage)


def _record_with_result(task: Task[Any, Any], services: WorkerServices, spec: PluginSpec,
                        error: ErrorInfo | None, *, usage: dict[str, Any], duration_ms: float,
                        generation: int, instance_id: str | None,
                        event: dict[str, Any] | None, notify: Encoded | None) -> bool:
    """The outcome record (and the instance's usage) queued on the MULTI that stores the
    job's result (tasks/result_store.py): no round trip of its own, and a worker that dies
    before the store records nothing of a run that is then run again. False: not possible
    here (the result backend is not pluginpool's Redis database)."""
    backend = task.backend
    if not isinstance(backend, JobResultBackend):
        return False
    breakers, enabled = services.breakers, services.settings.breaker_enabled
    keys, args = breakers.record_call(
        spec.id, spec.breaker, default_open_ms=spec.default_open_ms,
        error_type=error.type if error else None, duration_ms=duration_ms,
        generation=generation, error_event=_error_event(error),
        figures=_figures(usage), breaker_enabled=enabled, notify=notify,
        counted=counts_for_breaker(error))

    def queue(pipe: Any) -> None:
        pipe.execute_command("EVALSHA", breakers.script_sha, len(keys), *keys, *args)
        if instance_id is not None:
            _queue_instance(pipe, services, instance_id, error, usage)

    def done(replies: list[Any]) -> None:
        reply = replies[0] if replies else None
        if isinstance(reply, NoScriptError):  # Redis lost its scripts: the usual call
            recorded = _record_outcome(services, spec, error, duration_ms=duration_ms,
                                       generation=generation, usage=usage, notify=notify)
        elif reply is None or isinstance(reply, Exception):
            logger.error("could not record outcome of %s in its breaker: %s", spec.id, reply)
            recorded = False
        else:
            recorded = True
            if enabled:
                services.gate.learn(spec.id, CircuitBreaker.record_reply(reply))
        if event is not None and (notify is None or not recorded):
            services.usage_events.send(task, **event)
        if instance_id is not None and instance_usage.lost(replies[1:]):
            _record_instance(services, instance_id, error, usage)
            return
        for failed in (r for r in replies[1:] if isinstance(r, Exception)):
            logger.error("could not record the usage of instance %s: %s", instance_id, failed)

    return backend.with_result(str(task.request.id), queue, done)


def _error_event(error: ErrorInfo | None) -> dict[str, Any] | None:
    return None if error is None else {**error.model_dump(mode="json"), "at": time.time()}


def _figures(usage: dict[str, Any]) -> dict[str, Any]:
    return {name: usage.get(source) for name, source in HEALTH_FIGURES.items()}


def keep_run(task: Task[Any, Any], services: WorkerServices, plugin_id: str, *, job_id: str,
             ok: bool, duration_ms: float, error: dict[str, Any] | None, logs: str,
             instance_id: str | None) -> None:
    """The run in the plugin's recent runs (and its logs in the instance's last run): in the
    MULTI that stores the job's result when the backend takes it (tasks/result_store.py), no
    round trip of its own; else one (tasks/runs.py). Its logs go to the worker's log now."""
    keys = services.settings.keys
    worker = task.request.hostname

    def write(pipe: Any) -> None:
        RecentRuns(services.redis, keys).record(
            pipe, plugin_id, job_id=job_id, ok=ok, duration_ms=duration_ms, error=error,
            logs=logs, worker=worker, instance_id=instance_id)
        if instance_id is not None:
            instance_usage.queue_logs(pipe, keys, instance_id, logs)

    def done(replies: list[Any]) -> None:
        if instance_id is not None and instance_usage.lost(replies):
            replies = [r for r in replies if not isinstance(r, NoScriptError)]
            replies += instance_usage.write_alone(services.redis, lambda pipe: instance_usage.
                                                  queue_logs(pipe, keys, instance_id, logs))
        for reply in replies:
            if isinstance(reply, Exception):
                logger.warning("could not record the run of job %s: %s", job_id, reply)

    backend = task.backend
    if isinstance(backend, JobResultBackend) and backend.with_result(job_id, write, done):
        forward(logs, plugin_id=plugin_id, job_id=job_id,
                level=services.settings.run_log_level)
        return
    after_run(services.redis, keys, plugin_id, job_id=job_id, ok=ok, duration_ms=duration_ms,
              error=error, logs=logs, worker=worker, instance_id=instance_id,
              log_level=services.settings.run_log_level)


class UsageEvents:
    """Sends `task-plugin-usage` through one event dispatcher per process (Task.send_event
    would build a dispatcher, and take a connection from the pool, for every event)."""

    def __init__(self) -> None:
        self._dispatcher: Any = None
        self._pid = 0
        self._encoder = EventEncoder()

    def encode(self, task: Task[Any, Any], **fields: Any) -> Encoded | None:
        """The event as the record script publishes it; None if it cannot be encoded."""
        try:
            channel, message = self._encoder.encode(task.app, str(task.request.hostname),
                                                    USAGE_EVENT, **fields)
            return self._encoder.broker_prefix + channel, message
        except Exception as exc:  # sent the usual way then
            logger.warning("could not encode a usage event: %r", exc)
            return None

    def send(self, task: Task[Any, Any], **fields: Any) -> None:
        try:
            if self._dispatcher is None or self._pid != os.getpid():
                connection = task.app.connection_for_write()
                self._dispatcher = task.app.events.Dispatcher(
                    connection, hostname=task.request.hostname, enabled=True,
                    buffer_while_offline=False)
                self._pid = os.getpid()
            self._dispatcher.send(USAGE_EVENT, **fields)
        except Exception as exc:  # an event is best effort; the durable record is not
            logger.warning("could not send a usage event: %r", exc)
            self._dispatcher = None


def record_restart(services: WorkerServices, plugin_id: str) -> None:
    """A job's process died (or was killed for a limit) and the job is run again."""
    keys = services.settings.keys
    minute = int(time.time() // 60)
    try:
        with services.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(keys.health(plugin_id), "restarts", 1)
            pipe.hincrby(f"{keys.health_minute_prefix(plugin_id)}{minute}", "restarts", 1)
            pipe.expire(f"{keys.health_minute_prefix(plugin_id)}{minute}", 3600)
            pipe.execute()
    except redis.RedisError as exc:
        logger.error("could not count a restart of %s: %s", plugin_id, exc)


def counts_for_breaker(error: ErrorInfo | None) -> bool:
    """Whether the outcome goes into the breaker's window: not a call of a listed operation
    the plugin's code lacks (it fails alone; opening the breaker would stop the operations
    that work)."""
    return (error is None or error.type is not ErrorType.DEPENDENCY
            or error.details.get("operation_missing") is not True)


def _record_outcome(services: WorkerServices, spec: PluginSpec, error: ErrorInfo | None, *,
                    duration_ms: float, generation: int, usage: dict[str, Any],
                    notify: Encoded | None = None) -> bool:
    enabled = services.settings.breaker_enabled
    after = services.breakers.record(
        spec.id, spec.breaker, default_open_ms=spec.default_open_ms,
        error_type=error.type if error else None, duration_ms=duration_ms,
        generation=generation, error_event=_error_event(error), figures=_figures(usage),
        breaker_enabled=enabled, notify=notify, counted=counts_for_breaker(error))
    if enabled:
        services.gate.learn(spec.id, after)
    return after is not None


def _record_instance(services: WorkerServices, instance_id: str, error: ErrorInfo | None,
                     usage: dict[str, Any]) -> None:
    try:
        replies = instance_usage.write_alone(services.redis, lambda pipe: _queue_instance(
            pipe, services, instance_id, error, usage))
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
    except redis.RedisError as exc:
        logger.error("could not record the usage of instance %s: %s", instance_id, exc)


def _queue_instance(pipe: Any, services: WorkerServices, instance_id: str,
                    error: ErrorInfo | None, usage: dict[str, Any]) -> None:
    last = {"at": time.time(), "ok": error is None, "usage": usage,
            "error": error.model_dump(mode="json") if error else None}
    instance_usage.queue_run(
        pipe, services.settings.keys, instance_id, failed=error is not None, last_run=last,
        summed={name: float(usage.get(name) or 0) for name in SUMMED_USAGE},
        errors_kept=RECENT_ERRORS)


def connect_outcome_signals(app: Celery, services: WorkerServices) -> None:
    """Record what only Celery's main process sees, for this app's plugin tasks: hard time
    limits and exhausted restarts (the task body's process is gone), and Celery's own retry
    of a job whose pool child died. Connected by the worker that builds the app."""

    def on_failure(sender: Any = None, task_id: str | None = None,
                   exception: BaseException | None = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            _record_failure_seen_by_main_process(services, sender, task_id, exception)

    def on_retry(sender: Any = None, reason: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            _count_worker_lost_restart(services, sender, reason)

    task_failure.connect(on_failure, weak=False)
    task_retry.connect(on_retry, weak=False)


def _record_failure_seen_by_main_process(services: WorkerServices, sender: Any,
                                         task_id: str | None,
                                         exception: BaseException | None) -> None:
    plugin_id = plugin_of_task(str(getattr(sender, "name", "")))
    if plugin_id is None or not isinstance(exception, TimeLimitExceeded | WorkerLostError):
        return
    try:
        spec = services.specs.get(plugin_id)
    except (UnknownPluginError, redis.RedisError) as exc:
        logger.error("cannot record the failure of %s[%s]: %s", sender.name, task_id, exc)
        return
    error = error_for_failure(exception, plugin_id=spec.id, job_id=str(task_id))
    limit_s = spec.deadlines.celery_hard_s
    duration_ms = limit_s * 1000 if isinstance(exception, TimeLimitExceeded) else 0.0
    record_run(None, services, spec, error.info, usage={}, duration_ms=duration_ms,
               generation=0, instance_id=None)


def _count_worker_lost_restart(services: WorkerServices, sender: Any, reason: Any) -> None:
    plugin_id = plugin_of_task(str(getattr(sender, "name", "")))
    if plugin_id is not None and isinstance(getattr(reason, "exc", None), WorkerLostError):
        record_restart(services, plugin_id)
