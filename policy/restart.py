"""What to do when the process running a job dies: restart it later, or give up.

Plain Celery with acks_late and reject_on_worker_lost redelivers such a job forever
(a poison message); this policy bounds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pluginpool.policy.limits import IsolationConfig


@dataclass(frozen=True)
class RestartDecision:
    """Restart after `cooldown_ms`, or stop with a definitive error."""

    restart: bool
    cooldown_ms: int
    deaths: int
    reason: str


def decide_restart(isolation: IsolationConfig, *, deaths: int) -> RestartDecision:
    """Decide after the `deaths`-th death of a job's process (1 for the first)."""
    if not isolation.auto_restart:
        return RestartDecision(False, 0, deaths, "auto_restart is off")
    if deaths > isolation.max_restarts:
        return RestartDecision(
            False, 0, deaths, f"restarts exhausted ({isolation.max_restarts} allowed)"
        )
    return RestartDecision(True, isolation.restart_cooldown_ms, deaths, "restarting")
