"""Workers follow the registry: they consume the queues of the plugins they are meant to,
as plugins are registered, changed and unregistered, without a restart.

A Celery bootstep in the worker's main process runs one thread that listens to the
registry's change events (`keys.registry_channel`) and, on each event and every
`fleet_reconcile_s` anyway, reads the registry and works out which plugins this worker
should serve (its `--plugins` selector: `all`, ids, or fnmatch globs such as `acme-*`).
Pub/sub is fire-and-forget, so the periodic read is what makes a worker that missed an
event (a reconnect, a restart of Redis) catch up on its own.

The thread changes nothing in the consumer itself: it hands the wanted set to the event
loop with `consumer.call_soon` (thread-safe, wakes the loop), where Celery's own consumer
control does the work, as the `add_consumer`/`cancel_consumer` control commands do:
register the plugin's task (its strategy is built at its first message), `add_task_queue`,
`cancel_task_queue`. A registry change also bumps a counter in memory shared with the
pool children, so their spec caches fetch the new revision on their next job.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis

from pluginpool.pool.plugin_tasks import ensure_plugin_task
from pluginpool.pool.thread_step import ThreadStep
from pluginpool.tasks.pause import disabled_ids
from pluginpool.tasks.ready_index import ReadyIndexChannel
from pluginpool.tasks.registry import Registry, parse_event
from pluginpool.tasks.retire import sweep_unregistered
from pluginpool.tasks.routing import PLUGIN_QUEUE_PREFIX, queue_name
from pluginpool.tasks.spec import PluginSpec

logger = logging.getLogger("pluginpool.fleet")

IDLE_QUEUE = "pluginpool.idle"
"""The queue a worker consumes when no registered plugin matches it (Celery needs one);
nothing is ever sent to it."""


@dataclass(frozen=True)
class PluginSelector:
    """Which plugins a worker serves: `all`, or comma-separated ids and fnmatch globs."""

    patterns: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> PluginSelector:
        items = tuple(p.strip() for p in text.split(",") if p.strip())
        return cls(("*",) if items in ((), ("all",)) else items)

    @property
    def exact_ids(self) -> list[str]:
        return [p for p in self.patterns if not any(ch in p for ch in "*?[")]

    def matches(self, plugin_id: str) -> bool:
        return any(fnmatch.fnmatchcase(plugin_id, pattern) for pattern in self.patterns)


FULL_READ_EVERY = 12
"""A periodic reconciliation re-reads every spec at least this often (every minute at
the default 5 s), even when the registry's change counter did not move."""


class SharedGeneration:
    """A counter in shared memory, bumped by the main process, read by pool children."""

    def __init__(self) -> None:
        from multiprocessing.sharedctypes import RawValue  # an anonymous shared mapping

        self._value: Any = RawValue("q", 0)

    def bump(self) -> None:
        self._value.value += 1

    def __call__(self) -> int:
        return int(self._value.value)


@dataclass(frozen=True)
class FleetConfig:
    """What the registry follower (below) needs of the worker that adds it."""

    selector: PluginSelector
    generation: SharedGeneration
    revisions: dict[str, int]
    """The revisions of the plugins the worker started with (its spec cache holds them):
    the follower bumps the generation only when the registry differs from these."""


class RegistryFollower(ThreadStep):
    """Keeps this worker's plugin queues and tasks in step with the registry."""

    thread_name = "pluginpool-fleet"
    fleet: FleetConfig  # bound by the worker (`bound_step`)

    def setup(self, worker: Any) -> None:
        fleet = self.fleet
        services = self.services
        self._worker = worker
        self._selector: PluginSelector = fleet.selector
        self._generation: SharedGeneration = fleet.generation
        self._registry: Registry = services.registry
        self._redis: redis.Redis = services.redis
        self._channel = services.settings.keys.registry_channel
        self._keys = services.settings.keys
        self._every_s: float = services.settings.fleet_reconcile_s
        self._revisions: dict[str, int] = dict(fleet.revisions)
        self._wanted_pass = 0  # counts replacements of self._wanted
        self._applied: tuple[int, frozenset[str], int] | None = None
        self._version: int | None = None
        self._wanted: dict[str, PluginSpec] = {}
        self._passes = 0

    # -- the follower thread ------------------------------------------------------------

    def run(self) -> None:
        pubsub: Any = None
        next_reconcile = 0.0
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self._redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                    pubsub.subscribe(self._channel, self._keys.ops_channel)
                    next_reconcile = 0.0  # caught up from scratch after (re)subscribing
                wait_s = max(0.0, min(1.0, next_reconcile - time.monotonic()))
                message = pubsub.get_message(timeout=wait_s)
                event = parse_event(message["data"]) if message else None
                if event is not None:
                    logger.info("registry: %s %s revision %d", event.action, event.plugin_id,
                                event.revision)
                operator = message is not None and message["channel"] == self._keys.ops_channel
                if event is not None or operator or time.monotonic() >= next_reconcile:
                    self.reconcile()
                    next_reconcile = time.monotonic() + self._every_s
            except redis.RedisError as exc:
                logger.warning("registry follower: Redis unavailable, retrying: %s", exc)
                if pubsub is not None:
                    pubsub.close()
                pubsub = None
                self._stop.wait(1.0)
        if pubsub is not None:
            pubsub.close()

    def reconcile(self) -> None:
        """Read the registry; hand the plugins to serve to the event loop.

        The periodic pass reads one counter and re-reads every spec only when it moved
        (or every FULL_READ_EVERY passes): a worker's idle cost must not grow with the
        number of plugins registered."""
        version = self._registry.version()
        self._passes += 1
        if version == self._version and self._passes % FULL_READ_EVERY:
            wanted = self._wanted
        else:
            wanted = {spec.id: spec for spec in self._registry.all()
                      if self._selector.matches(spec.id)}
            self._version, self._wanted = version, wanted
            self._wanted_pass += 1
        revisions = {pid: spec.revision for pid, spec in wanted.items()}
        if revisions != self._revisions:
            self._generation.bump()
            self._revisions = revisions
        # A plugin an operator disabled keeps its task, not its queue: jobs wait there.
        disabled = disabled_ids(self._redis, self._keys)
        self._worker.consumer.call_soon(self._apply, wanted, disabled, self._wanted_pass)
        gone = {plugin_id: (queue_name(plugin_id), revision)
                for plugin_id, revision in self._registry.unregistered().items()
                if self._selector.matches(plugin_id)}
        sweep_unregistered(self._worker.app, gone)

    # -- in the event loop ----------------------------------------------------------------

    def _apply(self, wanted: dict[str, PluginSpec], disabled: set[str],
               wanted_pass: int = 0) -> None:
        consumer = self._worker.consumer
        if consumer.task_consumer is None:
            return  # the consumer is (re)connecting; the next reconciliation applies it
        # Nothing changed since the last pass applied (same registry read, same disabled
        # plugins, same consumer): with 10,000 plugins a pass costs ~30 ms of the loop.
        applied = (wanted_pass, frozenset(disabled), id(consumer.task_consumer))
        if wanted_pass and applied == self._applied:
            return
        app = self._worker.app
        strategies = consumer.strategies
        for spec in wanted.values():
            # A new task gets its strategy at its first message (lazy_strategies.py): Celery's
            # update_strategies rebuilt every task's for one new task, holding the event
            # loop for seconds with 10,000 plugins. A task whose time limits changed has its
            # strategy dropped, to be built again with them at its next message.
            if ensure_plugin_task(app, spec, self.services):
                strategies.pop(spec.task_name, None)
        consuming = {q for q in app.amqp.queues.consume_from
                     if q.startswith(PLUGIN_QUEUE_PREFIX)}
        wanted_queues = {spec.queue for spec in wanted.values() if spec.id not in disabled}
        for queue in sorted(wanted_queues - consuming):
            consumer.add_task_queue(queue)
            logger.info("now consuming %s", queue)
        channel = getattr(consumer.task_consumer, "channel", None)
        for queue in sorted(consuming - wanted_queues):
            consumer.cancel_task_queue(queue)
            if isinstance(channel, ReadyIndexChannel):
                channel.withdraw_queue(queue)  # the whole group stops serving it
            logger.info("stopped consuming %s", queue)
        self._applied = applied
