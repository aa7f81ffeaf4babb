"""Each worker sweeps its host's unused per-revision environments (pool/sandbox/env_gc.py).

A Celery bootstep in the worker's main process: every `env_sweep_s` a thread lists the
environments unused for `env_keep_s` and, only if there are any, reads the registry to
keep those a registered revision resolves to, then removes the rest. Every worker of a host
may sweep the same directory: the install lock each removal takes makes them safe together.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import redis

from pluginpool.pool.sandbox import env_gc, env_install
from pluginpool.pool.sandbox.environments import Environments
from pluginpool.pool.thread_step import ThreadStep
from pluginpool.tasks.spec import PluginSpec

logger = logging.getLogger("pluginpool.sandbox.environments")

SCRATCH_GRACE_S = 60.0
"""Beyond the install timeout and its kill grace, before an installer's scratch directory
counts as left behind."""


def sweep_once(environments: Environments, specs: Callable[[], list[PluginSpec]], *,
               keep_s: float) -> env_gc.SweepReport:
    """One sweep; `specs` is called (a registry read) only when something is stale."""
    envs_dir = str(environments.envs_dir)
    scratch_age = environments.install_timeout_s + env_install.KILL_GRACE_S + SCRATCH_GRACE_S
    current: set[str] = set()
    if env_gc.stale_keys(envs_dir, keep_s=keep_s):
        current = environments.current_keys(specs())
    return env_gc.sweep(envs_dir, keep_s=keep_s, current=current,
                        scratch_max_age_s=scratch_age)


class EnvironmentSweeper(ThreadStep):
    thread_name = "pluginpool-env-sweep"

    def setup(self, worker: Any) -> None:
        settings = self.services.settings
        self._every_s = settings.env_sweep_s
        self._keep_s = settings.env_keep_s
        self._environments = Environments.from_settings(settings, interpreter=sys.executable)
        self._registry = self.services.registry
        if self._every_s > 0 and self._keep_s < settings.warm_idle_s + env_gc.TOUCH_EVERY_S:
            logger.warning("PLUGINPOOL_ENV_KEEP_S (%.0f s) is shorter than an idle warm "
                           "sandbox may live (PLUGINPOOL_WARM_IDLE_S + %.0f s): an environment "
                           "an idle warm sandbox still uses may be removed under it",
                           self._keep_s, env_gc.TOUCH_EVERY_S)

    def run(self) -> None:
        if self._every_s <= 0:
            return
        while not self._stop.wait(self._every_s):
            if not self._environments.envs_dir.is_dir():
                continue  # no environment installed on this host yet
            try:
                report = sweep_once(self._environments, self._registry.all,
                                    keep_s=self._keep_s)
            except (OSError, redis.RedisError) as exc:
                logger.warning("sweeping unused environments failed, retrying later: %r", exc)
                continue
            if report.removed or report.scratch_removed:
                logger.info("environments swept: %d removed, %d scratch directories removed, "
                            "%d kept for registered revisions, %d busy", len(report.removed),
                            report.scratch_removed, report.kept_current, report.kept_busy)
