"""The services a worker process's plugin tasks use, built once per worker from settings
and handed to each task, step and signal handler explicitly (`register_plugin_task`,
`pool/worker.py`), the way arq hands its jobs a `ctx`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from pluginpool.policy.breaker import CircuitBreaker
from pluginpool.pool.gate import BreakerGate
from pluginpool.pool.in_process_instances import InProcessInstances
from pluginpool.pool.loader import PluginLoader, add_plugin_paths
from pluginpool.pool.recording import UsageEvents
from pluginpool.pool.runner import InProcessRunner, Runner
from pluginpool.tasks.instances import InstanceStore
from pluginpool.tasks.redis_conn import redis_client
from pluginpool.tasks.registry import Registry, SpecCache
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec

RunnerFactory = Callable[["WorkerServices"], Runner]


@dataclass
class WorkerServices:
    """What the task needs in a worker process, built once per process from settings."""

    settings: Settings
    redis: redis.Redis
    registry: Registry
    specs: SpecCache
    instances: InstanceStore
    loader: PluginLoader
    breakers: CircuitBreaker
    gate: BreakerGate
    usage_events: UsageEvents = field(default_factory=UsageEvents)
    runners: dict[bool, Runner] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings,
              sandbox_runner: RunnerFactory | None = None) -> WorkerServices:
        add_plugin_paths(settings.plugin_paths)
        client = redis_client(settings)
        registry = Registry(client, settings.keys,
                            visibility_timeout_s=settings.visibility_timeout_s)
        loader = PluginLoader(registered=lambda pid: client.hexists(settings.keys.specs, pid))
        # A job reaching a worker was admitted by its producer: if the breaker's Redis is
        # unreachable here, run it (fail open).
        breakers = CircuitBreaker(client, settings.keys, fail_mode="open")
        services = cls(settings=settings, redis=client, registry=registry,
                       specs=SpecCache(registry, ttl_s=settings.spec_cache_ttl_s),
                       instances=InstanceStore(client, settings.keys), loader=loader,
                       breakers=breakers,
                       gate=BreakerGate(breakers, cache_ms=settings.breaker_gate_cache_ms))
        in_process = InProcessRunner(
            loader, max_result_bytes=settings.max_result_bytes,
            max_log_bytes=settings.max_log_bytes,
            instances=InProcessInstances(idle_s=settings.warm_idle_s, redis_client=client,
                                         unload_channel=settings.keys.unload_channel))
        services.runners[False] = in_process
        services.runners[True] = sandbox_runner(services) if sandbox_runner else in_process
        return services

    def runner_for(self, spec: PluginSpec) -> Runner:
        return self.runners[spec.isolation.sandboxed]
