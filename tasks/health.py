"""Reading a plugin's health from Redis: durable figures written with every outcome, the
breaker, the queue, instances and the workers' own heartbeats.

Used alike by `PluginClient.health`, the CLI and the aggregator's HTTP API, so they agree;
none of them needs the aggregator to be up to count runs and outcomes.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import redis

from pluginpool.policy.health import (
    HealthThresholds,
    PluginHealth,
    Recent,
    classify,
    percentile_from_buckets,
)
from pluginpool.policy.keys import RedisKeys
from pluginpool.tasks.spec import PluginSpec

HISTORY_MINUTES = 15
LIVE_AFTER_MISSED_BEATS = 3


def queues_digest(queues: list[str]) -> str:
    """Names a worker's queue list on its heartbeat, so the list itself (10,000 names with
    10,000 plugins) is written and read again only when it changes."""
    return hashlib.sha1("\n".join(queues).encode(), usedforsecurity=False).hexdigest()[:16]


class WorkerRoster:
    """The workers' heartbeats with their queue lists, each list fetched once per digest.

    A heartbeat carries only the digest of its worker's queues; the lists live in
    `RedisKeys.worker_queues`. A long-lived reader (the aggregator, a producer) keeps the
    lists it has seen, so a read costs one small HGETALL while no worker's queues change."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self._redis = client
        self._keys = keys
        self._lists: dict[str, tuple[str, list[str]]] = {}

    def entries(self) -> dict[str, dict[str, Any]]:
        """Worker node → its heartbeat entry, with `queues` filled in."""
        entries: dict[str, dict[str, Any]] = {}
        for node, raw in self._redis.hgetall(self._keys.workers).items():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries[str(node)] = entry
        missing = [node for node, entry in entries.items() if "queues" not in entry
                   and self._lists.get(node, ("", []))[0] != entry.get("queues_digest")]
        if missing:
            listed = self._redis.hmget(self._keys.worker_queues, missing)
            for node, names in zip(missing, listed, strict=True):
                try:
                    queues = [str(queue) for queue in json.loads(names)] if names else []
                except (ValueError, TypeError):
                    queues = []
                self._lists[node] = (str(entries[node].get("queues_digest")), queues)
        for node in list(self._lists):
            if node not in entries:
                del self._lists[node]
        for node, entry in entries.items():
            if "queues" not in entry:  # a worker of a release that wrote its list inline
                entry["queues"] = self._lists.get(node, ("", []))[1]
        return entries

    def live(self, *, heartbeat_s: float, now: float | None = None) -> dict[str, list[str]]:
        """Worker node → the queues it consumes, for workers whose heartbeat is recent."""
        now = time.time() if now is None else now
        return {node: list(entry["queues"]) for node, entry in self.entries().items()
                if now - float(entry.get("at", 0)) <= heartbeat_s * LIVE_AFTER_MISSED_BEATS}


def live_workers(client: redis.Redis, keys: RedisKeys, *, heartbeat_s: float,
                 now: float | None = None) -> dict[str, list[str]]:
    """Worker node → the queues it consumes, for workers whose heartbeat is recent."""
    return WorkerRoster(client, keys).live(heartbeat_s=heartbeat_s, now=now)


READ_BATCH = 200
"""Plugins read per pipeline by `read_all`."""

PLUGIN_READS = 6
"""Commands per plugin that every health read makes (figures, breaker, queue depth,
instances, recent errors, pause); the HISTORY_MINUTES per-minute hashes come on top, only
for plugins that may have any (`_may_have_history`)."""


class HealthReader:
    def __init__(self, client: redis.Redis, keys: RedisKeys, *, thresholds: HealthThresholds,
                 heartbeat_s: float) -> None:
        self._redis = client
        self._keys = keys
        self._thresholds = thresholds
        self._heartbeat_s = heartbeat_s
        self.roster = WorkerRoster(client, keys)

    def read_all(self, specs: list[PluginSpec]) -> list[PluginHealth]:
        """Every plugin's health, READ_BATCH plugins per round trip: with 10,000 plugins a
        round trip each made one /health answer cost 10,000 round trips.

        Two passes per batch: the per-plugin figures first, then the per-minute history
        only of plugins that recorded something within it. Most of a large fleet is idle
        in any quarter hour; reading fifteen empty hashes for each idle plugin made three
        quarters of the commands of a full read."""
        workers = self.roster.live(heartbeat_s=self._heartbeat_s)
        now = time.time()
        minutes = self._minutes(now)
        empty_history: list[dict[str, str]] = [{} for _ in minutes]
        items: list[PluginHealth] = []
        for start in range(0, len(specs), READ_BATCH):
            batch = specs[start:start + READ_BATCH]
            with self._redis.pipeline(transaction=False) as pipe:
                for spec in batch:
                    self._queue_reads(pipe, spec)
                replies = pipe.execute()
            per_plugin = [replies[index * PLUGIN_READS:(index + 1) * PLUGIN_READS]
                          for index in range(len(batch))]
            active = [index for index, reads in enumerate(per_plugin)
                      if _may_have_history(reads[0], now)]
            if active:
                with self._redis.pipeline(transaction=False) as pipe:
                    for index in active:
                        self._queue_history(pipe, batch[index], minutes)
                    history = pipe.execute()
                for position, index in enumerate(active):
                    per_plugin[index] = per_plugin[index] + history[
                        position * len(minutes):(position + 1) * len(minutes)]
            for spec, reads in zip(batch, per_plugin, strict=True):
                if len(reads) == PLUGIN_READS:
                    reads = reads + empty_history
                items.append(self._build(spec, reads, workers=workers, now=now,
                                         minutes=minutes))
        return items

    def read(self, spec: PluginSpec, *, workers: dict[str, list[str]] | None = None
             ) -> PluginHealth:
        if workers is None:
            workers = self.roster.live(heartbeat_s=self._heartbeat_s)
        now = time.time()
        minutes = self._minutes(now)
        with self._redis.pipeline(transaction=False) as pipe:
            self._queue_reads(pipe, spec)
            self._queue_history(pipe, spec, minutes)
            replies = pipe.execute()
        return self._build(spec, replies, workers=workers, now=now, minutes=minutes)

    @staticmethod
    def _minutes(now: float) -> list[int]:
        minute_now = int(now // 60)
        return [minute_now - offset for offset in range(HISTORY_MINUTES - 1, -1, -1)]

    def _queue_reads(self, pipe: Any, spec: PluginSpec) -> None:
        keys = self._keys
        pipe.hgetall(keys.health(spec.id))
        pipe.hmget(keys.breaker(spec.id), "state", "open_until_ms", "forced")
        pipe.llen(spec.queue)
        pipe.scard(keys.instances_of(spec.id))
        pipe.lrange(keys.recent_errors(spec.id), 0, 9)
        pipe.hget(keys.paused, spec.id)

    def _queue_history(self, pipe: Any, spec: PluginSpec, minutes: list[int]) -> None:
        for minute in minutes:
            pipe.hgetall(f"{self._keys.health_minute_prefix(spec.id)}{minute}")

    def _build(self, spec: PluginSpec, replies: list[Any], *, workers: dict[str, list[str]],
               now: float, minutes: list[int]) -> PluginHealth:
        figures, breaker, depth, instances, errors, paused, *per_minute = replies
        breaker_state = _breaker_state(breaker, now)
        recent = self._recent(minutes, per_minute)
        consuming = sorted(node for node, queues in workers.items() if spec.queue in queues)
        dependency_stands = figures.get("last_error_type") == "dependency" and int(
            figures.get("last_error_ms", 0)) > int(figures.get("last_success_ms", 0))
        status, reasons = classify(
            breaker_state=breaker_state, live_workers=len(consuming),
            dependency_error_stands=dependency_stands, recent=recent, queue_depth=int(depth),
            thresholds=self._thresholds)
        runs = int(figures.get("runs", 0))
        pause = json.loads(paused)["mode"] if paused else None
        if pause == "disabled":  # no worker consumes its queue on purpose: say why first
            reasons = [f"disabled by an operator ({json.loads(paused).get('by')})",
                       *[r for r in reasons if "no live worker" not in r]]
        elif pause == "draining":
            reasons = ["draining: new jobs are refused", *reasons]
        return PluginHealth(
            plugin_id=spec.id, status=status, reasons=reasons, runs=runs,
            succeeded=int(figures.get("succeeded", 0)),
            failures={k.split(":", 1)[1]: int(v) for k, v in figures.items()
                      if k.startswith("failed:")},
            restarts=int(figures.get("restarts", 0)), active_instances=int(instances),
            queue_depth=int(depth), workers=consuming, breaker_state=breaker_state,
            paused=pause,
            recent=recent, usage=_usage(figures, runs),
            limits=spec.resource_limits.model_dump(),
            last_errors=[_without_traceback(json.loads(item)) for item in errors],
            latency_buckets={k.split(":", 1)[1]: int(v) for k, v in figures.items()
                             if k.startswith("lat:")},
            updated_at=now)

    def _recent(self, minutes: list[int], per_minute: list[dict[str, str]]) -> Recent:
        window = self._thresholds.window_minutes
        history = [{"minute": minute * 60, "runs": int(fig.get("runs", 0)),
                    "failed": int(fig.get("failed", 0)),
                    "restarts": int(fig.get("restarts", 0))}
                   for minute, fig in zip(minutes, per_minute, strict=True)]
        last = history[-window:]
        runs = sum(item["runs"] for item in last)
        failed = sum(item["failed"] for item in last)
        buckets: dict[str, int] = {}
        for fig in per_minute[-window:]:
            for key, value in fig.items():
                if key.startswith("lat:"):
                    bound = key.split(":", 1)[1]
                    buckets[bound] = buckets.get(bound, 0) + int(value)
        return Recent(runs=runs, failed=failed,
                      restarts=sum(item["restarts"] for item in last),
                      error_rate=round(failed / runs, 4) if runs else 0.0,
                      latency_ms={f"p{int(q * 100)}": percentile_from_buckets(buckets, q)
                                  for q in (0.5, 0.95, 0.99)},
                      history=history)


def _without_traceback(event: dict[str, Any]) -> dict[str, Any]:
    """Health is polled (the dashboard: every 2 s) and lists ten errors per plugin: it shows
    their (bounded) messages; the tracebacks stay in job results, `sandbox_info` and the
    `on_error` events."""
    details = event.get("details")
    if isinstance(details, dict) and ("traceback" in details or "logs" in details):
        event["details"] = {k: v for k, v in details.items()
                            if k not in ("traceback", "logs")}
    return event


def _breaker_state(raw: list[Any], now: float) -> str:
    state, open_until, forced = raw
    if state == "open" and forced != "1" and open_until and float(open_until) <= now * 1000:
        return "half_open"  # the wait is over: the next dispatch becomes a trial
    return str(state or "closed")


def _usage(figures: dict[str, str], runs: int) -> dict[str, float | None]:
    def avg(name: str) -> float | None:
        return round(float(figures[name]) / runs, 3) if runs and name in figures else None

    def num(name: str) -> float | None:
        return round(float(figures[name]), 3) if name in figures else None

    return {"peak_memory_mb": num("memory_mb_max"), "avg_memory_mb": avg("memory_mb_sum"),
            "avg_cpu_percent": avg("cpu_percent_sum"), "avg_cpu_ms": avg("cpu_ms_sum"),
            "avg_wall_ms": avg("wall_ms_sum"), "network_requests": num("network_requests_sum"),
            "peak_storage_kb": num("storage_kb_max")}


def _may_have_history(figures: dict[str, str], now: float) -> bool:
    """Whether a plugin's per-minute hashes can hold anything within the history window.

    Every outcome stamps `last_success_ms` or `last_error_ms`; restarts are counted
    without a stamp, so a plugin that ever restarted is always read in full. Exact: a
    plugin with neither a recent stamp nor a restart has only empty minutes."""
    if int(figures.get("restarts", 0)):
        return True
    last_ms = max(int(float(figures.get("last_success_ms", 0))),
                  int(float(figures.get("last_error_ms", 0))))
    return last_ms >= (now - (HISTORY_MINUTES + 1) * 60) * 1000
