"""One object names every clock of a job: they fire in order, never at the same instant."""

from __future__ import annotations

import pytest

from pluginpool.policy.deadlines import SOFT_MARGIN_S, Deadlines


@pytest.mark.parametrize(("timeout_ms", "setup_timeout_ms"),
                         [(10, 10), (500, 1000), (30_000, 30_000), (86_400_000, 10)])
def test_sandboxed_clocks_fire_in_order_with_their_margins(timeout_ms: int,
                                                           setup_timeout_ms: int) -> None:
    d = Deadlines.of(timeout_ms=timeout_ms, setup_timeout_ms=setup_timeout_ms)
    assert d.run_kill_s == timeout_ms / 1000
    assert d.cpu_backstop_s > d.run_kill_s  # CPU time of one thread never passes wall time
    assert d.celery_soft_s >= d.setup_kill_s + d.run_kill_s + SOFT_MARGIN_S
    assert d.celery_hard_s >= d.celery_soft_s + 1
    assert d.setup_cpu_backstop_s > d.setup_kill_s


def test_unsandboxed_the_celery_soft_limit_is_the_deadline() -> None:
    d = Deadlines.of(timeout_ms=500, setup_timeout_ms=30_000, sandboxed=False)
    assert d.celery_soft_s == 0.5
    assert d.celery_hard_s == 1.5
