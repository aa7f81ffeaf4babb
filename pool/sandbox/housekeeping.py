"""The housekeeper of one pool process's warm sandboxes: a daemon thread that retires
the sandboxes of unloaded instances (told by pub/sub), retires idle ones, sees retired
ones to their end, and publishes what each sandbox is doing for `sandbox_info`.

The pool process never forks once sandboxes are warm (zygotes start through
posix_spawn/exec), so a thread here is safe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time

import psutil
import redis

from pluginpool.policy.keys import RedisKeys
from pluginpool.pool.sandbox import owners
from pluginpool.pool.sandbox.process_handle import parent_of
from pluginpool.pool.sandbox.runtime.limits import MB
from pluginpool.pool.sandbox.runtime.messages import Closed
from pluginpool.pool.sandbox.warm import CLOSE_WAIT_S, WarmSandbox
from pluginpool.pool.sandbox.warm_pool import WarmPool

logger = logging.getLogger("pluginpool.sandbox.housekeeping")

TICK_S = 1.0
PUBLISH_EVERY_S = 2.0
PUBLISHED_TTL_S = 15
SWEEP_EVERY_S = 60.0
STALE_HOME_S = 60.0


class Housekeeper(threading.Thread):
    def __init__(self, pool: WarmPool, client: redis.Redis, keys: RedisKeys, *,
                 worker: str, warm_root: str | None = None) -> None:
        super().__init__(name="pluginpool-warm-housekeeper", daemon=True)
        self.pool = pool
        self.redis = client
        self.keys = keys
        self.worker = worker
        self._published: dict[tuple[str, int], float] = {}
        self._last_publish = 0.0
        self.warm_root = warm_root
        self._next_sweep = 0.0  # at the first tick: what a pool process that died left

    def run(self) -> None:
        pubsub: redis.client.PubSub | None = None
        while True:
            try:
                if pubsub is None:
                    pubsub = self.redis.pubsub(  # type: ignore[no-untyped-call]
                        ignore_subscribe_messages=True)
                    pubsub.subscribe(self.keys.unload_channel)
                message = pubsub.get_message(timeout=TICK_S)
                if message is not None:
                    self.pool.retire_instance(str(message["data"]))
            except redis.RedisError as exc:
                logger.warning("warm sandboxes: unload channel unavailable: %r", exc)
                pubsub = None
                time.sleep(TICK_S)
            try:
                self.tick()
            except Exception:  # one bad tick must not end retirement for good
                logger.exception("warm sandboxes: housekeeping failed; going on")

    def tick(self) -> None:
        self.pool.retire_idle()
        self.finish_retiring()
        if self.warm_root and time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + SWEEP_EVERY_S
            owners.sweep(self.warm_root)
            sweep_stale_homes(self.warm_root)
        if time.monotonic() - self._last_publish >= PUBLISH_EVERY_S:
            self._last_publish = time.monotonic()
            with contextlib.suppress(redis.RedisError):
                self._publish(self.pool.snapshot())

    def finish_retiring(self) -> None:
        """See every retired sandbox to its end (teardown bounded), log it, unpublish it."""
        for sandbox in self.pool.take_retiring():
            try:
                closed = sandbox.finish()
            except Exception:  # finish() kills it whatever happens
                logger.exception("warm sandbox %s (pid %d): teardown broke", sandbox.key,
                                 sandbox.pid)
                closed = None
            reason = sandbox.retired_for or "died"
            if closed is not None and closed.error is not None:
                logger.warning("warm sandbox %s (pid %d) retired (%s); %s", sandbox.key,
                               sandbox.pid, reason, closed.error.message[:500])
            else:
                logger.info("warm sandbox %s (pid %d) retired (%s); %s", sandbox.key,
                            sandbox.pid, reason, teardown_outcome(closed))
            self._unpublish(sandbox)

    def _field(self, sandbox: WarmSandbox) -> str:
        return f"{self.worker}/{sandbox.pid}"

    def _publish(self, sandboxes: list[WarmSandbox]) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for sandbox in sandboxes:
                if sandbox.instance_id is None:
                    continue
                rss, uss = memory_of(sandbox.pid)
                key = self.keys.warm_sandboxes(sandbox.instance_id)
                pipe.hset(key, self._field(sandbox), json.dumps({
                    "worker": self.worker, "pool_pid": os.getpid(), "pid": sandbox.pid,
                    "guardian_pid": guardian_of(sandbox.pid), "since": sandbox.since,
                    "setup_ms": round(sandbox.setup_ms, 3), "runs": sandbox.runs,
                    "rss_mb": rss, "uss_mb": uss,
                    "published_at": time.time()}))
                pipe.expire(key, PUBLISHED_TTL_S)
            pipe.execute()

    def _unpublish(self, sandbox: WarmSandbox) -> None:
        if sandbox.instance_id is not None:
            with contextlib.suppress(redis.RedisError):
                self.redis.hdel(self.keys.warm_sandboxes(sandbox.instance_id),
                                self._field(sandbox))


def teardown_outcome(closed: Closed | None) -> str:
    """How a retired sandbox's teardown went, for its log line."""
    if closed is None:
        return (f"teardown cut short (no answer within {CLOSE_WAIT_S:.0f} s, or the zygote "
                "was gone)")
    return "teardown ran" if closed.teardown else "no teardown (the plugin defines no close)"


def sweep_stale_homes(warm_root: str) -> None:
    """Remove homes left empty by zygotes whose pool process died (a zygote empties its home
    but may not remove it). A live home is never empty (it holds `setup`), and the age
    guard leaves one being created alone."""
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(warm_root):
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False) and entry.name != owners.OWNERS_DIR \
                        and now - entry.stat(follow_symlinks=False).st_mtime > STALE_HOME_S:
                    os.rmdir(entry.path)  # fails, as it should, unless it is empty


def guardian_of(zygote: int) -> int | None:
    """A zygote's parent, its guardian; None if it has none (PID 1: started without one, or
    its guardian is gone) or is gone."""
    parent = parent_of(zygote)
    return parent if parent is not None and parent > 1 else None


def memory_of(pid: int) -> tuple[float, float | None]:
    """Resident and unique memory of a process, MB (unique needs smaps: None if unreadable)."""
    try:
        proc = psutil.Process(pid)
        try:
            full = proc.memory_full_info()
            return round(full.rss / MB, 3), round(full.uss / MB, 3)
        except psutil.AccessDenied:
            return round(proc.memory_info().rss / MB, 3), None
    except psutil.Error:
        return 0.0, None
