"""Plugin tasks that exist in every worker process, even for plugins registered after it
forked.

Celery looks a task up by name in `app._tasks` in the worker's main process (to route a
message) and in each prefork pool child (to run it). Pool children are forked once, so a
plugin registered later is unknown to them. `PluginTaskRegistry` is Celery's task registry
with a fallback: a `plugin.<id>` name it does not hold is built from the plugin registry
in Redis on first use (task and tracer, as Celery's pool initializer does for the tasks it
knows). A plugin that is not registered any more still gets a task, not kept, whose run
ends in the typed `dependency` error "plugin is not registered (any more)".
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.app.registry import TaskRegistry
from celery.app.trace import build_tracer

from pluginpool.policy.errors import UnknownPluginError
from pluginpool.pool.execution import register_plugin_task
from pluginpool.pool.worker_services import WorkerServices
from pluginpool.tasks.routing import plugin_of_task
from pluginpool.tasks.spec import PluginSpec

PLACEHOLDER_ENTRYPOINT = "pluginpool.unregistered:plugin"


class PluginTaskRegistry(TaskRegistry):  # type: ignore[misc]
    """Celery's task registry, building unknown `plugin.<id>` tasks on demand."""

    def __init__(self, app: Celery, hostname: str, tasks: dict[str, Any],
                 services: WorkerServices) -> None:
        super().__init__(tasks)
        self._app = app
        self._hostname = hostname
        self._services = services

    def __missing__(self, name: str) -> Any:
        plugin_id = plugin_of_task(name)
        if plugin_id is None:
            raise self.NotRegistered(name)
        keep = True
        try:
            spec = self._services.registry.get(plugin_id)
        except UnknownPluginError:
            spec, keep = PluginSpec(id=plugin_id, name=plugin_id,
                                    entrypoint=PLACEHOLDER_ENTRYPOINT), False
        task = register_plugin_task(self._app, spec, self._services)
        task.__trace__ = build_tracer(name, task, self._app.loader, self._hostname,
                                      app=self._app)
        if not keep:
            dict.pop(self, name, None)
        return task


def install_task_registry(app: Celery, hostname: str, services: WorkerServices) -> None:
    """Give a worker app the fallback registry; before the app is finalized."""
    app._tasks = PluginTaskRegistry(app, hostname, dict(app._tasks),  # type: ignore[attr-defined]
                                    services)


def ensure_plugin_task(app: Celery, spec: PluginSpec, services: WorkerServices) -> bool:
    """Register the plugin's task, or bring its options up to date with this revision.
    True when the task is new or its time limits changed: the consumer's strategy for it
    (which holds them as the defaults for messages that carry none, as a plain Celery
    producer's) must be built again."""
    tasks: dict[str, Any] = app._tasks  # type: ignore[attr-defined]
    if spec.task_name not in tasks:
        register_plugin_task(app, spec, services)
        return True
    task: Any = tasks[spec.task_name]  # a PluginTask; its stubs type limits as int
    isolation, deadlines = spec.isolation, spec.deadlines
    task.max_retries = isolation.max_restarts if isolation.auto_restart else 0
    task.default_retry_delay = isolation.restart_cooldown_ms / 1000
    limits = (deadlines.celery_soft_s, deadlines.celery_hard_s)
    changed = (task.soft_time_limit, task.time_limit) != limits
    task.soft_time_limit, task.time_limit = limits
    return bool(changed)
