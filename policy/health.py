"""Per-plugin health: the model operators read, and the pure rules that classify it.

unhealthy: the breaker is open, no live worker consumes the plugin's queue, or a
           dependency error stands (no success since it);
degraded:  the breaker is half-open, the recent error rate or restart count is above its
           threshold, or the queue is deeper than it should be;
healthy:   none of these. Every status carries the reasons that decided it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class HealthStatus(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


class HealthThresholds(BaseModel):
    """When a plugin counts as degraded (settings: PLUGINPOOL_HEALTH__<FIELD>)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_minutes: int = Field(default=5, ge=1, le=60)
    degraded_error_rate: float = Field(default=0.2, gt=0, le=1)
    minimum_runs: int = Field(default=5, ge=1, description="runs in the window before judging")
    degraded_restarts: int = Field(default=3, ge=1, description="restarts in the window")
    degraded_queue_depth: int = Field(default=1000, ge=1)


class Recent(BaseModel):
    """The last `window_minutes`, from per-minute figures."""

    runs: int = 0
    failed: int = 0
    restarts: int = 0
    error_rate: float = 0.0
    latency_ms: dict[str, float | None] = Field(default_factory=dict)
    history: list[dict[str, Any]] = Field(default_factory=list)
    """Per minute, oldest first: minute (unix s), runs, failed, restarts."""


class PluginHealth(BaseModel):
    plugin_id: str
    status: HealthStatus
    reasons: list[str]
    runs: int = 0
    succeeded: int = 0
    failures: dict[str, int] = Field(default_factory=dict)
    restarts: int = 0
    active_instances: int = 0
    queue_depth: int = 0
    workers: list[str] = Field(default_factory=list)
    breaker_state: str = "closed"
    recent: Recent = Field(default_factory=Recent)
    usage: dict[str, float | None] = Field(default_factory=dict)
    limits: dict[str, Any] = Field(default_factory=dict)
    last_errors: list[dict[str, Any]] = Field(default_factory=list)
    paused: str | None = None
    """`disabled` or `draining` when an operator said so (tasks/operations.py)."""
    running: int | None = None
    """Runs in progress now, as the aggregator sees them in Celery's events (live only)."""
    latency_buckets: dict[str, int] = Field(default_factory=dict)
    """Cumulative count of runs per latency bucket (`le` in ms), for histograms."""
    updated_at: float = 0.0


def classify(*, breaker_state: str, live_workers: int, dependency_error_stands: bool,
             recent: Recent, queue_depth: int, thresholds: HealthThresholds
             ) -> tuple[HealthStatus, list[str]]:
    """The status and every reason for it, most serious first."""
    unhealthy = []
    if breaker_state == "open":
        unhealthy.append("circuit breaker is open")
    if live_workers == 0:
        unhealthy.append("no live worker consumes the plugin's queue")
    if dependency_error_stands:
        unhealthy.append("a dependency error stands (no success since)")
    if unhealthy:
        return HealthStatus.UNHEALTHY, unhealthy
    degraded = []
    if breaker_state == "half_open":
        degraded.append("circuit breaker is half-open (trial runs)")
    if recent.runs >= thresholds.minimum_runs and \
            recent.error_rate >= thresholds.degraded_error_rate:
        degraded.append(f"error rate {recent.error_rate:.0%} over the last "
                        f"{thresholds.window_minutes} min")
    if recent.restarts >= thresholds.degraded_restarts:
        degraded.append(f"{recent.restarts} restarts over the last "
                        f"{thresholds.window_minutes} min")
    if queue_depth > thresholds.degraded_queue_depth:
        degraded.append(f"queue depth {queue_depth} above {thresholds.degraded_queue_depth}")
    if degraded:
        return HealthStatus.DEGRADED, degraded
    return HealthStatus.HEALTHY, []


LATENCY_BUCKETS_MS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 65, 80, 100, 150,
                      200, 300, 500, 750, 1000, 2500, 5000, 10000, 30000, 60000)
"""Upper bounds (ms) of the run-duration buckets, one fixed set for every plugin (and
`+Inf`): a bucket every 1-2 ms up to 6 ms, every 2-5 ms up to 30 ms, so 1-50 ms runs are
told apart. Counted by policy/outcome.lua, served by /metrics."""


def percentile_from_buckets(buckets: dict[str, int], q: float) -> float | None:
    """The q-th quantile (ms), interpolated linearly inside the bucket that holds it (as
    Prometheus's histogram_quantile does); infinity if it lies beyond the last bound."""
    total = sum(buckets.values())
    if total == 0:
        return None
    ordered = sorted(buckets.items(), key=lambda kv: float("inf") if kv[0] == "inf"
                     else float(kv[0]))
    seen, lower = 0, 0.0
    rank = q * total
    for bound, count in ordered:
        if count and seen + count >= rank:
            if bound == "inf":
                return float("inf")  # beyond the last bound
            upper = float(bound)
            return round(lower + (upper - lower) * (rank - seen) / count, 1)
        seen += count
        lower = lower if bound == "inf" else float(bound)
    return None
