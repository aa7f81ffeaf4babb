"""Every clock that bounds a job, derived from one plugin's limits, each with its margin.

Four clocks guard one job, and they must fire in this order, never at the same instant:

1. the supervisor's wall clock (`run_kill_s` = `timeout_ms`; `setup_kill_s` =
   `setup_timeout_ms` for a warm sandbox's setup): it kills the run and reports `timeout`
   with the run's usage. It is the clock that is meant to fire.
2. RLIMIT_CPU in the run (`cpu_backstop_s`): CPU seconds, a backstop for a supervisor that
   cannot act; a single thread's CPU time never passes its wall time, so it fires after 1.
3. Celery's soft limit (`celery_soft_s`): above the setup and the run together plus
   `SOFT_MARGIN_S`, so that it only fires when the pool child itself is stuck.
4. Celery's hard limit (`celery_hard_s`): the soft one plus a grace (10 %, at least 1 s, at
   most 30 s); the pool child is killed.

Unsandboxed plugins have no supervisor: for them Celery's soft limit is the deadline
(`timeout_ms`, setup included) and the hard one its backstop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SOFT_MARGIN_S = 2.0
"""Between the supervisor's kill and Celery's soft limit: the time to kill, reap and report."""
CPU_BACKSTOP_MARGIN_S = 1


@dataclass(frozen=True)
class Deadlines:
    """One job's clocks, in seconds."""

    run_kill_s: float
    setup_kill_s: float
    cpu_backstop_s: int
    celery_soft_s: float
    celery_hard_s: float

    @classmethod
    def of(cls, *, timeout_ms: int, setup_timeout_ms: int, sandboxed: bool = True) -> Deadlines:
        run_s = timeout_ms / 1000
        setup_s = setup_timeout_ms / 1000
        soft_s = setup_s + run_s + SOFT_MARGIN_S if sandboxed else run_s
        grace_s = min(max(soft_s * 0.1, 1.0), 30.0)
        return cls(run_kill_s=run_s, setup_kill_s=setup_s,
                   cpu_backstop_s=math.ceil(run_s) + CPU_BACKSTOP_MARGIN_S,
                   celery_soft_s=soft_s, celery_hard_s=soft_s + grace_s)

    @property
    def setup_cpu_backstop_s(self) -> int:
        return math.ceil(self.setup_kill_s) + CPU_BACKSTOP_MARGIN_S
