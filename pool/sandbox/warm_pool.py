"""The warm sandboxes of one pool process: at most `warm_sandboxes`, least recently used
retired first, idle ones retired after `warm_idle_s`, an unloaded instance's retired at once.

Shared by the task (which takes and returns a sandbox around each run) and the
housekeeper thread (which retires and publishes), so every change happens under one lock.
A sandbox in use is never retired under the run: it is marked and retired when returned.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from pluginpool.pool.recent_unloads import RecentUnloads
from pluginpool.pool.sandbox.warm import WarmKey, WarmSandbox


class WarmPool:
    def __init__(self, *, capacity: int, idle_s: float) -> None:
        self.capacity = capacity
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._sandboxes: OrderedDict[WarmKey, WarmSandbox] = OrderedDict()
        self._retiring: list[WarmSandbox] = []
        self._doomed: set[WarmKey] = set()
        self._unloaded = RecentUnloads()
        """A sandbox of one that was being set up when the unload came is retired when its
        run gives it back."""

    def take(self, key: WarmKey) -> WarmSandbox | None:
        """The live sandbox for this key, marked busy; a dead one is dropped (replaced by
        the caller)."""
        with self._lock:
            sandbox = self._sandboxes.get(key)
            if sandbox is None:
                return None
            if not sandbox.alive():
                del self._sandboxes[key]
                self._retiring.append(sandbox)
                return None
            self._sandboxes.move_to_end(key)
            sandbox.busy = True
            return sandbox

    def add(self, sandbox: WarmSandbox) -> None:
        """A newly set-up sandbox, busy; the least recently used idle ones beyond the
        capacity are retired."""
        with self._lock:
            sandbox.busy = True
            self._sandboxes[sandbox.key] = sandbox
            self._sandboxes.move_to_end(sandbox.key)
            for key in list(self._sandboxes):
                if len(self._sandboxes) <= self.capacity:
                    break
                other = self._sandboxes[key]
                if not other.busy:
                    self._retire_locked(other, "least recently used")

    def give_back(self, sandbox: WarmSandbox, *, dead: bool = False) -> None:
        with self._lock:
            sandbox.busy = False
            sandbox.last_used = time.monotonic()
            if dead:
                if self._sandboxes.get(sandbox.key) is sandbox:
                    del self._sandboxes[sandbox.key]
                self._retiring.append(sandbox)
            elif sandbox.key in self._doomed or sandbox.instance_id in self._unloaded:
                self._retire_locked(sandbox, "instance unloaded")

    def retire_instance(self, instance_id: str) -> None:
        with self._lock:
            self._unloaded.add(instance_id)
            for key, sandbox in list(self._sandboxes.items()):
                if key[2] == instance_id:
                    if sandbox.busy:
                        self._doomed.add(key)
                    else:
                        self._retire_locked(sandbox, "instance unloaded")

    def retire_idle(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            for sandbox in list(self._sandboxes.values()):
                if not sandbox.busy and now - sandbox.last_used >= self.idle_s:
                    self._retire_locked(sandbox, "idle")

    def retire_all(self) -> None:
        with self._lock:
            for sandbox in list(self._sandboxes.values()):
                self._retire_locked(sandbox, "shutdown")

    def _retire_locked(self, sandbox: WarmSandbox, reason: str) -> None:
        if self._sandboxes.get(sandbox.key) is sandbox:
            del self._sandboxes[sandbox.key]
        self._doomed.discard(sandbox.key)
        sandbox.retire(reason)
        self._retiring.append(sandbox)

    def take_retiring(self) -> list[WarmSandbox]:
        """Sandboxes asked to close (or dead) whose end the housekeeper still has to see."""
        with self._lock:
            retiring, self._retiring = self._retiring, []
            return retiring

    def snapshot(self) -> list[WarmSandbox]:
        with self._lock:
            return list(self._sandboxes.values())
