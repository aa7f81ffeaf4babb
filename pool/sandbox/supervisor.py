"""The pool child's side of a run: wall clock, memory, storage, CPU share, exact accounting.

It blocks on the run's channel between samples, so a fast run costs no sampling at all;
every `SAMPLE_S` it measures the run's process tree (psutil) and its workspace, and it
duty-cycles the process group with SIGSTOP/SIGCONT when `max_cpu_percent` is below 100
(no writable cgroup v2 here). Whatever happens, the whole process group is killed and
reaped before it returns.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from pluginpool.policy.limits import ResourceLimits
from pluginpool.pool.sandbox import channel

SAMPLE_S = 0.05
THROTTLE_PERIOD_S = 0.1
MB = 1024 * 1024

StorageHandler = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class Supervision:
    """What happened to one run's process."""

    result: dict[str, Any] | None = None
    layers: dict[str, Any] | None = None
    killed_for: str | None = None
    """timeout, memory, storage or result_size, when the supervisor stopped the run."""
    observed: float | None = None
    wait_status: int | None = None
    rusage: Any = None
    peak_memory_bytes: int = 0
    storage_bytes: int = 0
    wall_s: float = 0.0
    limit_crossed_at: float | None = None
    stopped_at: float | None = None
    stopped_at_unix: float | None = None
    descendants: set[int] = field(default_factory=set)


def directory_bytes(path: str) -> int:
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue
    return total


class Supervisor:
    def __init__(self, pid: int, fd: int, *, limits: ResourceLimits, workspace: str,
                 baseline_rss: int, storage: StorageHandler | None, max_frame_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pid = pid
        self.fd = fd
        self.limits = limits
        self.workspace = workspace
        self.baseline_rss = baseline_rss
        self.storage = storage
        self.max_frame_bytes = max_frame_bytes
        self.clock = clock
        self.out = Supervision()
        self._processes: dict[int, psutil.Process] = {}
        self._stopped = False

    # -- limits ---------------------------------------------------------------------------

    def _sample(self) -> None:
        try:
            root = self._processes.setdefault(self.pid, psutil.Process(self.pid))
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        rss = 0
        for proc in tree:
            self.out.descendants.add(proc.pid)
            with contextlib.suppress(psutil.Error):
                rss += proc.memory_info().rss
        used = max(rss - self.baseline_rss, 0)
        self.out.peak_memory_bytes = max(self.out.peak_memory_bytes, used)
        if used > self.limits.max_memory_mb * MB:
            self._stop("memory", used / MB)
            return
        stored = directory_bytes(self.workspace)
        self.out.storage_bytes = max(self.out.storage_bytes, stored)
        if stored > self.limits.max_storage_kb * 1024:
            self._stop("storage", stored / 1024)

    def _stop(self, reason: str, observed: float) -> None:
        self.out.killed_for = reason
        self.out.observed = observed
        self.out.limit_crossed_at = self.clock()
        self.kill()
        self.out.stopped_at = self.clock()
        self.out.stopped_at_unix = time.time()

    def _throttle(self, now: float, started: float) -> float:
        """SIGSTOP/SIGCONT the group so it gets max_cpu_percent of one core; returns the
        time of the next switch."""
        share = self.limits.max_cpu_percent / 100
        phase = (now - started) % THROTTLE_PERIOD_S
        run_s = THROTTLE_PERIOD_S * share
        should_run = phase < run_s
        if should_run == self._stopped:
            self._signal_group(signal.SIGCONT if should_run else signal.SIGSTOP)
            self._stopped = not should_run
        return now + ((run_s - phase) if should_run else (THROTTLE_PERIOD_S - phase))

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def kill(self) -> None:
        """Kill the run's process group and any descendant seen escaping it."""
        self._signal_group(signal.SIGKILL)
        for pid in self.out.descendants - {self.pid}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    # -- the loop -------------------------------------------------------------------------

    def _handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "started":
            self.out.layers = message.get("layers")
        elif op == "storage":
            reply = (self.storage(message) if self.storage is not None else
                     {"ok": False, "quota": False, "message": "no storage for this run"})
            channel.send(self.fd, reply)
        elif op == "result":
            self.out.result = message

    def run(self) -> Supervision:
        started = self.clock()
        deadline = started + self.limits.timeout_ms / 1000
        next_sample = started + SAMPLE_S
        throttle = self.limits.max_cpu_percent < 100
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        channel_open = True
        try:
            while self.out.result is None and self.out.killed_for is None:
                now = self.clock()
                if now >= deadline:
                    self._stop("timeout", (now - started) * 1000)
                    break
                if now >= next_sample:
                    self._sample()
                    next_sample = now + SAMPLE_S
                    continue
                wake = min(deadline, next_sample)
                if throttle:
                    wake = min(wake, self._throttle(now, started))
                if not channel_open:
                    if self._reap(block=False):
                        break
                    time.sleep(min(max(wake - now, 0), 0.01))
                    continue
                if not poller.poll(max(wake - now, 0) * 1000):
                    continue
                try:
                    self._handle(channel.receive(self.fd, max_bytes=self.max_frame_bytes))
                except channel.ChannelClosed:
                    channel_open = False
                except channel.FrameTooLarge as exc:
                    self._stop("result_size", exc.size)
                except (ValueError, OSError):
                    channel_open = False
        finally:
            self.out.wall_s = self.clock() - started
            if self.out.result is not None:
                self.out.storage_bytes = max(self.out.storage_bytes,
                                             directory_bytes(self.workspace))
            self.kill()
            self._reap(block=True)
        return self.out

    def _reap(self, *, block: bool) -> bool:
        if self.out.wait_status is not None:
            return True
        try:
            pid, status, rusage = os.wait4(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return False
        self.out.wait_status = status
        self.out.rusage = rusage
        return True
