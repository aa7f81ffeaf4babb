"""Class plugins set up in the pool child itself (`sandboxed = false`): the same lifecycle
as a warm sandbox. An instance is set up once per (plugin, revision, instance) and pool
process, kept for the last IN_PROCESS_INSTANCES of them, and torn down (its `close()`) when
it is the least recently used past that, idle for `PLUGINPOOL_WARM_IDLE_S`, unloaded (heard
on the unload channel, on every worker), or its pool process shuts down.

A teardown never runs inside a job, nor beside one: an instance is taken out of use between
jobs, and its teardown runs after, in a daemon thread of the pool process (or, with no
Redis to hear unloads, after the job, outside its logs and its error handling), when no
job runs or waits (`_turns`). A teardown that hangs holds up the next job for at most
TEARDOWN_WAIT_S, then jobs run beside it (logged), and no instance in use is taken from
them; at shutdown the teardowns get at most SHUTDOWN_TEARDOWNS_S, one that hangs included.
A teardown that raises is logged and counts for nothing.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import queue
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import redis

from pluginpool.policy.errors import ErrorType, PluginExecutionError
from pluginpool.pool.recent_unloads import RecentUnloads
from pluginpool.pool.sandbox.runtime.classify import describe, type_name
from pluginpool.pool.sandbox.runtime.plugin import read_operation
from pluginpool.pool.shutdown_exit import is_pool_shutdown
from pluginpool.tasks.spec import PluginSpec

logger = logging.getLogger("pluginpool.in_process")

IN_PROCESS_INSTANCES = 16
TICK_S = 1.0
SHUTDOWN_TEARDOWNS_S = 5.0
TEARDOWN_WAIT_S = 5.0
MAX_HUNG_TEARDOWNS = 8
"""Teardowns left running (hung) in one pool process before no more are started."""
_hung: list[threading.Thread] = []
InstanceKey = tuple[str, int, str | None]
"""(plugin id, revision, instance id)."""


class Loaded:
    """A plugin set up in this process: its operations by name and its teardown."""

    def __init__(self, spec: PluginSpec, target: Any, ctx: Any) -> None:
        factory: Any = target
        self.instance: Any = factory(ctx) if inspect.isclass(target) else None
        self.operations: dict[str, Any] = {}
        self.unreadable: dict[str, tuple[str, str]] = {}
        """Listed operations whose lookup raised (a property): (message, exception type);
        each fails alone, with an error made anew for every job that calls it."""
        if self.instance is None:
            self.operations["run"] = target
        for name in spec.operations if self.instance is not None else ():
            method, raised = read_operation(self.instance, name)
            if raised is not None:
                if is_pool_shutdown(raised):
                    raise raised
                self.unreadable[name] = (
                    f"reading operation {name!r} raised {describe(raised)}", type_name(raised))
            elif callable(method):
                self.operations[name] = method
        self.last_used = time.monotonic()

    def close(self) -> bool:
        """Run the teardown if the class defines one; whether it did."""
        close = getattr(self.instance, "close", None)
        if not callable(close):
            return False
        close()
        return True


def operation_of(loaded: Loaded, spec: PluginSpec, operation: str) -> Any:
    found = loaded.operations.get(operation)
    if found is None:
        if operation in loaded.unreadable:
            message, exception_type = loaded.unreadable[operation]
            raise PluginExecutionError.of(ErrorType.RUNTIME, message, plugin_id=spec.id,
                                          operation=operation, exception_type=exception_type)
        raise PluginExecutionError.of(
            ErrorType.DEPENDENCY, f"operation {operation!r} is not a method of the plugin",
            plugin_id=spec.id, operation=operation, operation_missing=True)
    return found


class InProcessInstances:
    """The set-up plugins of one pool process, their LRU and their teardowns."""

    def __init__(self, *, idle_s: float, capacity: int = IN_PROCESS_INSTANCES,
                 redis_client: redis.Redis | None = None, unload_channel: str | None = None
                 ) -> None:
        self.idle_s = idle_s
        self.capacity = capacity
        self._redis = redis_client
        self._unload_channel = unload_channel
        self._loaded: OrderedDict[InstanceKey, Loaded] = OrderedDict()
        self._turns = threading.Condition()
        """Whose turn it is: a job's run, or one teardown (never both, but for a teardown
        that hangs past TEARDOWN_WAIT_S: it is left running beside later jobs and
        teardowns); instances are taken out of use only between jobs. Not held while
        either runs (a plugin's code)."""
        self._job_running = False
        self._jobs_waiting = 0
        self._teardown_running = False
        self._teardown_started = 0.0
        self._to_close: queue.SimpleQueue[tuple[InstanceKey, Loaded, str]] = \
            queue.SimpleQueue()
        self._unloaded = RecentUnloads()
        self._listener_of = 0

    def get(self, key: InstanceKey) -> Loaded | None:
        loaded = self._loaded.get(key)
        if loaded is not None:
            self._loaded.move_to_end(key)
            loaded.last_used = time.monotonic()
        return loaded

    def add(self, key: InstanceKey, loaded: Loaded) -> None:
        """Keep a set-up plugin (during its first run, under the lock). What it pushes out
        of the LRU, and itself if its instance was unloaded while it was being set up, is
        torn down once the job is over."""
        self._loaded[key] = loaded
        while len(self._loaded) > self.capacity:
            self._to_close.put((*self._loaded.popitem(last=False), "least recently used"))
        if key[2] is not None and key[2] in self._unloaded:
            self._to_close.put((key, self._loaded.pop(key), "instance unloaded"))
        if loaded.instance is not None:
            self._ensure_listener()

    def after_job(self) -> None:
        """After a job, outside its logs and errors: with a listener thread the teardowns
        it made due are that thread's (never inside a job); without one, run here."""
        if self._listener_of != os.getpid():
            self._close_due()

    def retire_instance(self, instance_id: str) -> None:
        """Its instances are torn down between jobs: now if no job runs within TICK_S,
        else by the listener's next retire_idle (the unload is remembered)."""
        with self._turns:
            self._unloaded.add(instance_id)
        self.retire_idle()

    def retire_idle(self) -> None:
        """The idle and unloaded instances out of use, between jobs (waited for at most
        TICK_S: the next tick tries again), then their teardowns."""
        now = time.monotonic()
        with self._turns:
            if self._turns.wait_for(lambda: not self._job_running, timeout=TICK_S):
                for key, loaded in list(self._loaded.items()):
                    if key[2] is not None and key[2] in self._unloaded:
                        self._to_close.put((key, self._loaded.pop(key), "instance unloaded"))
                    elif now - loaded.last_used >= self.idle_s:
                        self._to_close.put((key, self._loaded.pop(key), "idle"))
        self._close_due()

    def retire_all(self, **_: Any) -> None:
        """The pool process is shutting down: every teardown, all of them within
        SHUTDOWN_TEARDOWNS_S (a daemon thread: one that hangs does not hold the exit)."""
        with self._turns:  # no job runs now; a teardown under way may hang: not waited for
            while self._loaded:
                self._to_close.put((*self._loaded.popitem(last=False), "shutdown"))
        closing = threading.Thread(target=self._close_due, daemon=True,
                                   name="pluginpool-in-process-teardowns")
        closing.start()
        closing.join(SHUTDOWN_TEARDOWNS_S)
        if closing.is_alive():
            logger.warning("in-process teardowns still running after %.0f s at shutdown; "
                           "the process exits without them", SHUTDOWN_TEARDOWNS_S)

    @contextlib.contextmanager
    def job(self) -> Iterator[None]:
        """Around a job's run: no teardown starts during it, and it waits for one under way
        (its output would go into the job's logs: stdout is the process's), but at most
        TEARDOWN_WAIT_S: a teardown that hangs does not hold up the jobs. A teardown
        waiting its turn lets a waiting job go first. The bookkeeping (and that bounded
        wait) is not interrupted by a signal (Celery's soft limit, a cancel): an exception
        there would leave the turns stuck and the listener waiting for good."""
        with _uninterrupted(), self._turns:
            # Up to TEARDOWN_WAIT_S since the teardown under way started (a job after
            # one that gave up waiting does not wait again).
            wait = TEARDOWN_WAIT_S - (time.monotonic() - self._teardown_started)
            self._jobs_waiting += 1
            free = self._turns.wait_for(lambda: not self._teardown_running,
                                        timeout=max(wait, 0.0))
            self._jobs_waiting -= 1
        if not free:
            logger.warning("a teardown has run for over %.0f s; jobs run beside it",
                           TEARDOWN_WAIT_S)
        try:
            with _uninterrupted(), self._turns:
                self._job_running = True
            yield
        finally:
            with _uninterrupted(), self._turns:
                self._job_running = False
                self._turns.notify_all()

    def _close_due(self) -> None:
        """The queued teardowns, one at a time when no job runs or waits (waited for at
        most TICK_S each time: what is left waits for the next call)."""
        while True:
            with _uninterrupted(), self._turns:
                if not self._turns.wait_for(
                        lambda: not self._job_running and not self._jobs_waiting,
                        timeout=TICK_S):
                    return
                try:
                    key, loaded, reason = self._to_close.get_nowait()
                except queue.Empty:
                    return
                self._teardown_running = True
                self._teardown_started = time.monotonic()
            try:
                _bounded_teardown(key, loaded, reason)
            finally:
                with _uninterrupted(), self._turns:
                    self._teardown_running = False
                    self._turns.notify_all()

    # -- the pool process's listener ------------------------------------------------------

    def _ensure_listener(self) -> None:
        if self._redis is None or self._unload_channel is None:
            return
        if self._listener_of == os.getpid():
            return
        self._listener_of = os.getpid()
        from celery.signals import worker_process_shutdown  # only where a worker runs it
        worker_process_shutdown.connect(self.retire_all, weak=False)
        threading.Thread(target=self._listen, name="pluginpool-in-process-instances",
                         daemon=True).start()

    def _listen(self) -> None:
        """Unloads from the channel, idle ones and those jobs pushed out every tick; an
        instance is taken out of use between runs (the lock), its teardown runs after,
        from here, so one that hangs holds up no job, and later teardowns for at most
        TEARDOWN_WAIT_S."""
        assert self._redis is not None and self._unload_channel is not None
        pubsub: Any = None
        while True:
            try:
                if pubsub is None:
                    pubsub = self._redis.pubsub(  # type: ignore[no-untyped-call]
                        ignore_subscribe_messages=True)
                    pubsub.subscribe(self._unload_channel)
                message = pubsub.get_message(timeout=TICK_S)
                if message is not None:
                    self.retire_instance(str(message["data"]))  # idle ones too
                else:
                    self.retire_idle()
            except redis.RedisError as exc:
                logger.warning("in-process instances: unload channel unavailable: %r", exc)
                pubsub = None
                time.sleep(TICK_S)
            except Exception:  # one bad teardown round must not end them for good
                logger.exception("in-process instances: retirement failed; going on")


_DEFERRED_SIGNALS = frozenset((signal.SIGUSR1, signal.SIGTERM, signal.SIGINT))
"""What Celery and billiard raise exceptions from in the main thread (SIGUSR1: the soft time
limit, also sent to cancel a job)."""


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Signals held back (delivered when it ends) in the calling thread, so their handlers'
    exceptions cannot land between two steps of bookkeeping."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _bounded_teardown(key: InstanceKey, loaded: Loaded, reason: str) -> None:
    """A teardown in a thread of its own, waited for at most TEARDOWN_WAIT_S: one that never
    returns is left running (a thread cannot be stopped; logged) and the later teardowns,
    unloads and idle retirements go on (run in the caller's thread, it stopped them all),
    beside it. Past MAX_HUNG_TEARDOWNS left running in this process, no more are started:
    each would hold its instance's memory for good."""
    _hung[:] = [thread for thread in _hung if thread.is_alive()]
    if len(_hung) >= MAX_HUNG_TEARDOWNS:
        logger.error("in-process plugin %s retired (%s); teardown not run: %d earlier "
                     "teardowns still hang in this pool process", key, reason, len(_hung))
        return
    thread = threading.Thread(target=_teardown, args=(key, loaded, reason), daemon=True,
                              name="pluginpool-in-process-teardown")
    try:
        thread.start()
    except RuntimeError as exc:  # no thread to be had
        logger.error("in-process plugin %s retired (%s); teardown not run: %s", key, reason,
                     exc)
        return
    with _uninterrupted():  # a soft limit landing here would replace the job's outcome
        thread.join(TEARDOWN_WAIT_S)
    if thread.is_alive():
        _hung.append(thread)
        logger.warning("in-process plugin %s: its teardown (%s) still runs after %.0f s; "
                       "left running, the next teardowns go on", key, reason,
                       TEARDOWN_WAIT_S)


def _teardown(key: InstanceKey, loaded: Loaded, reason: str) -> None:
    try:
        ran = loaded.close()
    except BaseException as exc:  # its failure is its own: logged (in a thread of its own:
        # nothing else to end, and a pool shutdown's SystemExit lands in the main thread)
        logger.warning("in-process plugin %s retired (%s); teardown failed: %s", key,
                       reason, describe(exc)[:500])
        return
    if loaded.instance is not None:
        logger.info("in-process plugin %s retired (%s); %s", key, reason,
                    "teardown ran" if ran else "no teardown (the plugin defines no close)")


__all__ = ["IN_PROCESS_INSTANCES", "InProcessInstances", "Loaded", "operation_of"]
