"""Starting a prefork Celery worker that consumes the queues of some (or all) plugins."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from celery import Celery

from pluginpool.policy.errors import PluginPoolError, UnknownPluginError
from pluginpool.pool.liveness import WorkerLiveness
from pluginpool.pool.sandbox.runner import SandboxRunner
from pluginpool.tasks.app import create_app
from pluginpool.tasks.execution import WorkerServices, attach_services, register_plugin_tasks
from pluginpool.tasks.redis_conn import redis_client
from pluginpool.tasks.registry import Registry
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec

WORKER_BASELINE_MB = 128
"""Headroom for the pool child itself (Celery, Python) above the plugins' max_memory_mb."""


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker will consume and how."""

    specs: list[PluginSpec]
    queues: list[str]
    concurrency: int
    nodename: str
    max_memory_per_child_kib: int

    def argv(self, *, loglevel: str) -> list[str]:
        return [
            "worker", "--pool=prefork", f"--concurrency={self.concurrency}",
            f"--hostname={self.nodename}", f"--queues={','.join(self.queues)}",
            f"--max-memory-per-child={self.max_memory_per_child_kib}",
            "--task-events", "--without-mingle", "--without-gossip",
            f"--loglevel={loglevel}",
        ]


def select_specs(registry: Registry, plugins: str) -> list[PluginSpec]:
    """`all`, or a comma-separated list of registered plugin ids."""
    registered = {spec.id: spec for spec in registry.all()}
    if plugins.strip() == "all":
        if not registered:
            raise PluginPoolError("no plugins are registered: run `pluginpool register FILE`")
        return list(registered.values())
    wanted = [pid.strip() for pid in plugins.split(",") if pid.strip()]
    missing = [pid for pid in wanted if pid not in registered]
    if missing:
        raise UnknownPluginError(", ".join(missing))
    return [registered[pid] for pid in wanted]


def plan_worker(settings: Settings, *, plugins: str = "all", concurrency: int | None = None,
                name: str | None = None, max_memory_per_child_mb: int | None = None) -> WorkerPlan:
    registry = Registry(redis_client(settings), settings.keys,
                        visibility_timeout_s=settings.visibility_timeout_s)
    specs = select_specs(registry, plugins)
    memory_mb = max_memory_per_child_mb or (
        max(spec.resource_limits.max_memory_mb for spec in specs) + WORKER_BASELINE_MB)
    return WorkerPlan(
        specs=specs,
        queues=[spec.queue for spec in specs],
        concurrency=concurrency or 2,
        nodename=name or f"pluginpool@{socket.gethostname()}",
        max_memory_per_child_kib=memory_mb * 1024,
    )


def build_worker_app(settings: Settings, specs: list[PluginSpec]) -> Celery:
    """The app with one task per plugin and the worker services attached."""
    app = create_app(settings)
    register_plugin_tasks(app, specs)
    attach_services(app, WorkerServices.build(settings, sandbox_runner=SandboxRunner.factory))
    app.steps["worker"].add(WorkerLiveness)
    return app


def run_worker(settings: Settings, plan: WorkerPlan, *, loglevel: str = "INFO") -> None:
    """Run the worker in this process until it is stopped (SIGTERM: warm shutdown)."""
    app = build_worker_app(settings, plan.specs)
    app.worker_main(argv=plan.argv(loglevel=loglevel))
