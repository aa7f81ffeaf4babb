"""The health rules, as pure functions."""

from __future__ import annotations

from pluginpool.policy.health import (
    HealthStatus,
    HealthThresholds,
    Recent,
    classify,
    percentile_from_buckets,
)

T = HealthThresholds()


def status(**overrides: object) -> tuple[HealthStatus, list[str]]:
    args: dict[str, object] = {"breaker_state": "closed", "live_workers": 1,
                               "dependency_error_stands": False, "recent": Recent(),
                               "queue_depth": 0, "thresholds": T}
    return classify(**{**args, **overrides})  # type: ignore[arg-type]


def test_healthy_by_default() -> None:
    assert status() == (HealthStatus.HEALTHY, [])


def test_unhealthy_reasons() -> None:
    assert status(breaker_state="open")[0] is HealthStatus.UNHEALTHY
    assert "no live worker" in status(live_workers=0)[1][0]
    assert "dependency" in status(dependency_error_stands=True)[1][0]
    both = status(breaker_state="open", live_workers=0)
    assert len(both[1]) == 2


def test_degraded_reasons() -> None:
    assert status(breaker_state="half_open")[0] is HealthStatus.DEGRADED
    failing = Recent(runs=10, failed=3, error_rate=0.3)
    assert "error rate 30%" in status(recent=failing)[1][0]
    assert status(recent=Recent(runs=2, failed=2, error_rate=1.0))[0] is HealthStatus.HEALTHY
    assert "restarts" in status(recent=Recent(restarts=3))[1][0]
    assert "queue depth" in status(queue_depth=5000)[1][0]


def test_percentiles_from_buckets() -> None:
    buckets = {"5": 50, "10": 40, "100": 9, "inf": 1}
    assert percentile_from_buckets(buckets, 0.5) == 5.0
    assert percentile_from_buckets(buckets, 0.95) == 100.0
    assert percentile_from_buckets(buckets, 0.999) == float("inf")
    assert percentile_from_buckets({}, 0.5) is None
