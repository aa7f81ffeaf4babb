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
    assert percentile_from_buckets(buckets, 0.95) == 60.0  # interpolated in (10, 100]
    assert percentile_from_buckets(buckets, 0.999) == float("inf")
    assert percentile_from_buckets({}, 0.5) is None


def test_latency_buckets_are_one_fixed_set_fine_enough_for_1_to_50_ms_runs() -> None:
    """outcome.lua counts with the same bounds Python serves, and runs of 5 ms and of
    15-25 ms get different p95s (the old set read 50 ms for both of the latter)."""
    import itertools
    import re
    from pathlib import Path

    import pluginpool.policy.health as health

    lua = (Path(health.__file__).parent / "outcome.lua").read_text()
    listed = re.search(r"LATENCY_BUCKETS_MS = \{([^}]*)\}", lua)
    assert listed is not None
    assert tuple(int(x) for x in listed.group(1).replace("\n", " ").split(",")) == \
        health.LATENCY_BUCKETS_MS
    inside = [b for b in health.LATENCY_BUCKETS_MS if b <= 50]
    assert len(inside) >= 12 and all(b - a <= 10 for a, b in itertools.pairwise(inside))

    def p95(ms: list[float]) -> float | None:
        counts: dict[str, int] = {}
        for value in ms:
            bound = next(b for b in health.LATENCY_BUCKETS_MS if value <= b)
            counts[str(bound)] = counts.get(str(bound), 0) + 1
        return percentile_from_buckets(counts, 0.95)

    fast = p95([4.6] * 100)
    slow = p95([15 + (i % 10) for i in range(100)])
    assert fast is not None and 4 <= fast <= 5
    assert slow is not None and 20 <= slow <= 25
