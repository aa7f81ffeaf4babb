"""Prometheus metrics, read from Redis at each scrape (prometheus_client's collector API)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pluginpool.policy.health import LATENCY_BUCKETS_MS, HealthStatus, PluginHealth
from pluginpool.tasks.deadletter import DeliveryStats

BREAKER_STATES = ("closed", "open", "half_open")


class PluginCollector(Collector):
    def __init__(self, read: Callable[[], list[PluginHealth]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        items = self._read()
        runs = CounterMetricFamily("pluginpool_plugin_runs", "Runs recorded", labels=["plugin"])
        ok = CounterMetricFamily("pluginpool_plugin_successes", "Successful runs",
                                 labels=["plugin"])
        failures = CounterMetricFamily("pluginpool_plugin_failures", "Failed runs by type",
                                       labels=["plugin", "type"])
        restarts = CounterMetricFamily("pluginpool_plugin_restarts",
                                       "Runs restarted after their process died",
                                       labels=["plugin"])
        queue = GaugeMetricFamily("pluginpool_plugin_queue_depth", "Jobs waiting",
                                  labels=["plugin"])
        workers = GaugeMetricFamily("pluginpool_plugin_workers", "Live workers on the queue",
                                    labels=["plugin"])
        instances = GaugeMetricFamily("pluginpool_plugin_instances", "Loaded instances",
                                      labels=["plugin"])
        status = GaugeMetricFamily("pluginpool_plugin_status", "1 for the current status",
                                   labels=["plugin", "status"])
        breaker = GaugeMetricFamily("pluginpool_breaker_state", "1 for the breaker's state",
                                    labels=["plugin", "state"])
        memory = GaugeMetricFamily("pluginpool_plugin_peak_memory_mb",
                                   "Peak memory of a run above the worker's baseline",
                                   labels=["plugin"])
        cpu = GaugeMetricFamily("pluginpool_plugin_avg_cpu_percent", "Average CPU % of a run",
                                labels=["plugin"])
        latency = HistogramMetricFamily("pluginpool_plugin_run_duration_ms",
                                        "Run duration in milliseconds", labels=["plugin"])
        for item in items:
            pid = item.plugin_id
            runs.add_metric([pid], item.runs)
            ok.add_metric([pid], item.succeeded)
            for kind, count in sorted(item.failures.items()):
                failures.add_metric([pid, kind], count)
            restarts.add_metric([pid], item.restarts)
            queue.add_metric([pid], item.queue_depth)
            workers.add_metric([pid], len(item.workers))
            instances.add_metric([pid], item.active_instances)
            for health in HealthStatus:
                status.add_metric([pid, health], 1.0 if item.status is health else 0.0)
            for state in BREAKER_STATES:
                breaker.add_metric([pid, state], 1.0 if item.breaker_state == state else 0.0)
            if item.usage.get("peak_memory_mb") is not None:
                memory.add_metric([pid], item.usage["peak_memory_mb"] or 0.0)
            if item.usage.get("avg_cpu_percent") is not None:
                cpu.add_metric([pid], item.usage["avg_cpu_percent"] or 0.0)
            counted = [(float(b), c) for b, c in item.latency_buckets.items() if b != "inf"]
            cumulative = [(str(bound), float(sum(c for b, c in counted if b <= bound)))
                          for bound in LATENCY_BUCKETS_MS]  # every bound, every plugin
            cumulative.append(("+Inf", float(item.runs)))
            wall_sum = (item.usage.get("avg_wall_ms") or 0.0) * item.runs
            latency.add_metric([pid], cumulative, sum_value=wall_sum)
        yield from (runs, ok, failures, restarts, queue, workers, instances, status, breaker,
                    memory, cpu, latency)


class DeliveryCollector(Collector):
    """The delivery path: dead letters waiting, rescues from dead workers, duplicates."""

    def __init__(self, read: Callable[[], DeliveryStats]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        stats = self._read()
        yield GaugeMetricFamily("pluginpool_dead_letters",
                                "Messages set aside in the dead-letter store",
                                value=stats.dead_letters)
        yield CounterMetricFamily("pluginpool_delivery_rescued",
                                  "Messages returned to their queues from a worker found dead",
                                  value=stats.rescued)
        yield CounterMetricFamily("pluginpool_delivery_late_acks",
                                  "Acknowledgements from a worker declared dead: each is a job "
                                  "that ran twice", value=stats.late_acks)
