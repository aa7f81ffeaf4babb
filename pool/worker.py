"""Starting a prefork Celery worker that consumes the queues of some (or all) plugins, and
follows the registry from then on (pool/fleet.py)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from billiard import pool as billiard_pool
from celery import Celery

from pluginpool.policy.errors import UnknownPluginError
from pluginpool.pool import trace_filter
from pluginpool.pool.artifact_cache import ArtifactCache, ArtifactRunner
from pluginpool.pool.cancel_listener import CancelListener
from pluginpool.pool.env_sweeper import EnvironmentSweeper
from pluginpool.pool.event_batching import CONSUMER_PATH, EVENT_BATCH_CONF
from pluginpool.pool.execution import bind_worker_app, register_plugin_tasks
from pluginpool.pool.fleet import (
    IDLE_QUEUE,
    FleetConfig,
    PluginSelector,
    RegistryFollower,
    SharedGeneration,
)
from pluginpool.pool.liveness import WorkerLiveness
from pluginpool.pool.plugin_tasks import install_task_registry
from pluginpool.pool.quarantine import fail_quarantined
from pluginpool.pool.sandbox.runner import SandboxRunner
from pluginpool.pool.stored_outcome import reserved_message_done
from pluginpool.pool.thread_step import bound_step
from pluginpool.pool.worker_services import WorkerServices
from pluginpool.tasks.app import create_app
from pluginpool.tasks.claim_qos import OUTCOME_STORED_OPTION
from pluginpool.tasks.delivery_record import DELIVERY_OPTION
from pluginpool.tasks.redis_conn import redis_client
from pluginpool.tasks.registry import Registry, SpecCache
from pluginpool.tasks.reliable_fetch import QUARANTINE_HOOK_OPTION
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
    selector: PluginSelector = field(default_factory=lambda: PluginSelector(("*",)))

    def argv(self, *, loglevel: str) -> list[str]:
        return [
            "worker", "--pool=prefork", f"--concurrency={self.concurrency}",
            f"--hostname={self.nodename}", f"--queues={','.join(self.queues)}",
            f"--max-memory-per-child={self.max_memory_per_child_kib}",
            "--task-events", "--without-mingle", "--without-gossip",
            f"--loglevel={loglevel}",
        ]


def select_specs(registry: Registry, plugins: str) -> list[PluginSpec]:
    """The registered plugins `plugins` selects now: `all`, ids, fnmatch globs (`acme-*`).
    None may match (the worker waits for them); an id that is not registered is refused,
    as a likely typo."""
    selector = PluginSelector.parse(plugins)
    registered = {spec.id: spec for spec in registry.all()}
    missing = [pid for pid in selector.exact_ids if pid not in registered]
    if missing:
        raise UnknownPluginError(", ".join(missing))
    return [spec for pid, spec in registered.items() if selector.matches(pid)]


def plan_worker(settings: Settings, *, plugins: str = "all", concurrency: int | None = None,
                name: str | None = None, max_memory_per_child_mb: int | None = None) -> WorkerPlan:
    registry = Registry(redis_client(settings), settings.keys,
                        visibility_timeout_s=settings.visibility_timeout_s)
    specs = select_specs(registry, plugins)
    memory_mb = max_memory_per_child_mb or (
        max([spec.resource_limits.max_memory_mb for spec in specs]
            or [settings.default_limits.max_memory_mb]) + WORKER_BASELINE_MB)
    return WorkerPlan(
        specs=specs,
        queues=[spec.queue for spec in specs] or [IDLE_QUEUE],
        concurrency=concurrency or 2,
        nodename=name or f"pluginpool@{socket.gethostname()}",
        max_memory_per_child_kib=memory_mb * 1024,
        selector=PluginSelector.parse(plugins),
    )


FOLLOWED_SPEC_TTL_S = 300.0
"""How long a worker keeps a spec at most. The registry follower drops every cached spec
on each change it hears of (at once on an event, within PLUGINPOOL_FLEET_RECONCILE_S
otherwise) and a job that names a newer revision fetches it, so the age bound is a last
resort. A short one made every job of a large fleet a registry read: with 1,000 plugins
each plugin's spec was older than 5 s at nearly every job."""


def build_worker_app(settings: Settings, specs: list[PluginSpec], *,
                     selector: PluginSelector | None = None,
                     nodename: str = "pluginpool@localhost") -> Celery:
    """The app with one task per plugin bound to the worker's services, and the steps that
    keep its heartbeat, follow the registry and hear cancels, each given those services."""
    app = create_app(settings)
    # Workers with the same selector consume the same queues: one ready index and one
    # wake-up list for all of them (see tasks/reliable_fetch.py).
    chosen = selector or PluginSelector(("*",))
    app.conf.broker_transport_options[DELIVERY_OPTION]["group"] = (
        "plugins:" + ",".join(sorted(chosen.patterns)))
    services = WorkerServices.build(settings, sandbox_runner=SandboxRunner.factory)
    generation = SharedGeneration()
    services.specs = SpecCache(services.registry,
                               ttl_s=max(settings.spec_cache_ttl_s, FOLLOWED_SPEC_TTL_S),
                               generation=generation)
    services.specs.prime(specs)  # before the pool forks: every child starts with them
    services.specs.follow(FOLLOWED_SPEC_TTL_S)  # past the age bound: the bulk snapshot
    artifacts = ArtifactCache.from_settings(settings)
    for sandboxed, runner in list(services.runners.items()):
        services.runners[sandboxed] = ArtifactRunner(runner, artifacts)
    install_task_registry(app, nodename, services)
    # Strategies built at first use, task events batched (pool/event_batching.py).
    app.conf.worker_consumer = CONSUMER_PATH
    app.conf[EVENT_BATCH_CONF] = settings.event_batch_ms / 1000
    # A job the poison rule quarantines gets its failure as an outcome (pool/quarantine.py).
    app.conf.broker_transport_options[QUARANTINE_HOOK_OPTION] = fail_quarantined(app, services)
    # A warm shutdown acknowledges, not hands back, a reserved job whose outcome is stored.
    app.conf.broker_transport_options[OUTCOME_STORED_OPTION] = reserved_message_done(app)
    register_plugin_tasks(app, specs, services)
    bind_worker_app(app, services)
    fleet = FleetConfig(selector=chosen, generation=generation,
                        revisions={spec.id: spec.revision for spec in specs})
    app.steps["worker"].add(bound_step(WorkerLiveness, services=services))
    app.steps["worker"].add(bound_step(RegistryFollower, services=services, fleet=fleet))
    app.steps["worker"].add(bound_step(CancelListener, services=services))
    app.steps["worker"].add(bound_step(EnvironmentSweeper, services=services))
    return app


POOL_EXIT_WAIT_S = 3.0
"""How long a pool process that is leaving waits for the main process to read its last
results (billiard waits 30 s: `GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT` x 0.1 s)."""


def shorten_pool_exit_wait() -> None:
    """At a warm shutdown the main process has stopped reading its pool processes' results
    before it joins them, so a pool process whose last result was still unread waited out
    billiard's 30 s for a read that never came, and the shutdown took 32 s instead of 2
    (stacks: `Pool.join` in `waitpid`; seen in about 1 rolling restart in 5 under load).
    What it wrote stays in the pipe either way. Set before the pool forks."""
    billiard_pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT = int(
        POOL_EXIT_WAIT_S / billiard_pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_INTERVAL)


def run_worker(settings: Settings, plan: WorkerPlan, *, loglevel: str = "INFO") -> None:
    """Run the worker in this process until it is stopped (SIGTERM: warm shutdown)."""
    app = build_worker_app(settings, plan.specs, selector=plan.selector,
                           nodename=plan.nodename)
    trace_filter.install()  # Celery's success lines without plugin values
    shorten_pool_exit_wait()
    app.worker_main(argv=plan.argv(loglevel=loglevel))
