"""The pool child's side of a setup or a run: wall clock, memory, storage, CPU share.

It blocks on the sandbox's channel between samples, so a fast run costs no sampling at all;
every `SAMPLE_S` it measures the process tree and the workspace from /proc (a few reads:
the run's threads' children lists and each process's statm; no psutil, which lists every
process on the host to find a tree), and it duty-cycles the process group with
SIGSTOP/SIGCONT when the CPU share is below 100 % (a cgroup would need a writable cgroup
tree, which an unprivileged worker does not have). Each wake-up costs the pool child
CPU on top of the plugin's share: bench/supervision.py measures it. The process it
watches is not its child (a run is the zygote's child, a zygote is detached), so its exit
and the kernel's accounting come through a Reaper.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pluginpool.pool.sandbox.frames import FrameDeadline, FrameReader, send_by
from pluginpool.pool.sandbox.output import OutputPipes
from pluginpool.pool.sandbox.process_handle import ProcessHandle, stat_fields
from pluginpool.pool.sandbox.runtime import channel
from pluginpool.pool.sandbox.runtime.limits import MB
from pluginpool.pool.sandbox.runtime.messages import (
    Log,
    Message,
    Ready,
    Result,
    SetupFailed,
    Started,
    StorageReply,
    StorageRequest,
)
from pluginpool.tasks.run_logs import LogTail

SAMPLE_S = 0.05
DEFAULT_LOG_BYTES = 65_536
THROTTLE_SLICE_S = 0.05
"""The shortest a throttled run runs between two looks at its CPU (then it is stopped for
about slice * (100 / share - 1): 150 ms at 25 %)."""
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROTOCOL_ERROR_CHARS = 300
STORAGE_REPLY_WAIT_S = 1.0
DRAIN_S = 0.1
"""The longest the channel is read once the process has ended or its deadline has come."""
MAX_WORKSPACE_ENTRIES = 10_000
"""Files and directories a run's (or setup's) workspace may hold: beyond it the run is
stopped as a `resource` error (`max_workspace_entries`)."""
MAX_TREE = 4096
"""A bound on the processes one sample walks (a fork bomb is killed by the pids it shows)."""

StorageHandler = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Exit:
    """How the watched process ended: wait status and kernel accounting, when known."""

    status: int | None = None
    cpu_s: float | None = None
    maxrss_kb: int | None = None
    sandbox_died: bool = False
    """The zygote itself is gone (its run died with it)."""


class Reaper(Protocol):
    def reap(self, *, block: bool) -> Exit | None:
        """The process's Exit once it has ended; None while it runs (only if not block)."""


class NotForked(Exception):
    """The zygote did not fork the run: it is gone, answered something else than Forked, or
    named a pid that is not its child (nothing of the run was left to kill)."""


class PendingFork(Protocol):
    def forked(self) -> tuple[ProcessHandle, int]:
        """(the run, checked to be the zygote's child, and the zygote's resident bytes when
        it forked), waiting for the zygote's Forked if it has not been read yet; NotForked
        if it never comes or names another process."""


@dataclass(frozen=True)
class Bounds:
    """What the supervisor enforces on one setup or run."""

    timeout_s: float
    max_memory_bytes: int
    max_storage_bytes: int
    cpu_percent: int
    clock_name: str = "timeout_ms"
    """The limit a wall-clock kill is reported against."""


@dataclass
class Supervision:
    """What happened to one setup or run."""

    result: Message | None = None
    """Result for a run; Ready or SetupFailed for a setup."""
    started: Started | None = None
    started_at: float | None = None
    finished_at: float | None = None
    killed_for: str | None = None
    """timeout, memory, storage, files, result_size or protocol, when the supervisor stopped
    it."""
    protocol_error: str | None = None
    """What was wrong with a frame it sent (killed_for protocol)."""
    observed: float | None = None
    exit: Exit | None = None
    peak_memory_bytes: int = 0
    storage_bytes: int = 0
    wall_s: float = 0.0
    limit_crossed_at: float | None = None
    stopped_at: float | None = None
    stopped_at_unix: float | None = None
    descendants: dict[int, bytes] = field(default_factory=dict)
    """Processes seen below the watched one, with their start times (a pid reused by
    another process after one ended is not killed in its place)."""
    workspace_empty: bool = False
    """The workspace was found empty once the run had ended and was reaped (its result
    came): warm.WarmSandbox.clean_workspace need not list it again."""
    logs: LogTail = field(default_factory=lambda: LogTail(DEFAULT_LOG_BYTES))
    """The run's stdout, stderr and ctx.logger, kept to their last max_log_bytes."""


def throttle_mechanism() -> str:
    """How a CPU share below 100 % is enforced (reported by bench/supervision.py)."""
    return (f"SIGSTOP/SIGCONT against a CPU budget (share of the wall time since the start), "
            f"looked at least every {THROTTLE_SLICE_S * 1000:.0f} ms of running")


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65_536)
    finally:
        os.close(fd)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from each thread's `children` list in /proc (the kernel
    keeps them: no scan of every process). Empty when `pid` is gone."""
    tree: list[int] = []
    stack = [pid]
    while stack and len(tree) < MAX_TREE:
        current = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        tree.append(current)
        for task in tasks:
            try:
                stack.extend(int(child) for child in
                             _read(f"/proc/{current}/task/{task}/children").split())
            except OSError:
                continue
    return tree


def _queued_bytes(fd: int) -> int:
    """Bytes waiting to be read on a socket (FIONREAD); 0 if it cannot say."""
    try:
        return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)
    except OSError:
        return 0


def start_time(pid: int) -> bytes | None:
    """When a process started (clock ticks since boot), as it reads; None when it is gone."""
    fields = stat_fields(pid)
    return fields[19] if fields else None


def cpu_seconds(pid: int) -> float:
    """CPU time one process has used, all its threads (those that ended included), user and
    system, in clock ticks (0 when it is gone)."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS if fields else 0.0


def resident_bytes(pid: int) -> int:
    """Resident memory of one process (0 when it is gone)."""
    try:
        return int(_read(f"/proc/{pid}/statm").split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
"""O_NOFOLLOW: a run that swaps a directory of its workspace for a symlink does not make
the pool child walk and count what it points to."""


def entries_of(path: str, *, sizes: bool = True) -> list[tuple[str, bool, int]]:
    """(name, is a directory, bytes: 0 unless `sizes`) of each entry of a directory, read
    without updating its access time (O_NOATIME): a run's workspace is put back as it was
    created after each run, and on ext4 (relatime) every listing used to stamp it, so every
    run ended with two journalled inode updates (the stamp and the restore)."""
    try:
        fd = os.open(path, _LIST_FLAGS | os.O_NOATIME)
    except PermissionError:  # O_NOATIME needs the owner: list it the usual way
        fd = os.open(path, _LIST_FLAGS)
    try:
        with os.scandir(fd) as listing:
            found = []
            for entry in listing:
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                    found.append((entry.name, is_dir, 0 if is_dir or not sizes else
                                  entry.stat(follow_symlinks=False).st_blocks * 512))
                except OSError:
                    continue
            return found
    finally:
        os.close(fd)


def directory_usage(path: str, *, max_entries: int = MAX_WORKSPACE_ENTRIES
                    ) -> tuple[int, bool, int]:
    """(bytes under `path`, whether `path` itself could be listed and was empty, entries
    counted). The walk stops once it has counted more than `max_entries` entries: empty
    files take no blocks, so a run could otherwise make the pool child walk (every sample)
    and then delete hundreds of thousands of them within its storage quota."""
    total = 0
    count = 0
    stack = [path]
    empty = False
    while stack and count <= max_entries:
        top = stack.pop()
        try:
            entries = entries_of(top)
        except OSError:
            continue
        if top is path:
            empty = not entries
        count += len(entries)
        for name, is_dir, size in entries:
            if is_dir:
                stack.append(os.path.join(top, name))
            total += size
    return total, empty, count


FINAL = (Result, Ready, SetupFailed)


def storage_reply(raw: dict[str, Any]) -> StorageReply:
    """InstanceStorage.handle's answer as the typed reply."""
    return StorageReply(ok=bool(raw.get("ok")), value=raw.get("value"),
                        quota=bool(raw.get("quota")), limit_bytes=int(raw.get("limit_bytes", 0)),
                        observed_bytes=int(raw.get("observed_bytes", 0)),
                        message=str(raw.get("message", "")),
                        unloaded=bool(raw.get("unloaded")))


class Supervisor:
    """Watches one setup or run. With `pending` (and no pid), supervision starts as soon as
    the Spawn is sent: the run's pid and the zygote's size come from its Forked frame, read
    only when first needed (the run's first frame, a sample, the wall clock, the end), and
    since a run writes Forked before Started, a run costs the pool child one wake-up fewer.
    Its clock then also counts the fork itself (about 0.3 ms), except for a throttled run,
    whose Forked is awaited first so its CPU budget starts where it did."""

    def __init__(self, pid: int | None, fd: int, *, bounds: Bounds, workspace: str,
                 baseline_rss: int, storage: StorageHandler | None, max_frame_bytes: int,
                 reaper: Reaper, kill_after: bool = True,
                 clock: Callable[[], float] = time.monotonic,
                 max_log_bytes: int = DEFAULT_LOG_BYTES,
                 pending: PendingFork | None = None, output: OutputPipes | None = None
                 ) -> None:
        if pid is None and pending is None:
            raise ValueError("a pid, or the pending fork that gives it")
        self.pid = pid
        self.process: ProcessHandle | None = None if pid is None else ProcessHandle.open(pid)
        self.pending = pending
        self.fd = fd
        self.bounds = bounds
        self.workspace = workspace
        self.baseline_rss = baseline_rss
        self.storage = storage
        self.max_frame_bytes = max_frame_bytes
        self.reaper = reaper
        self.kill_after = kill_after
        self.clock = clock
        self.out = Supervision(logs=LogTail(max_log_bytes))
        self.output = output
        """Read with the channel while the process lives, drained once it is reaped."""
        self._stopped = False

    def _pid(self) -> int:
        """The watched process (a pending run's Forked read, if it was not yet)."""
        if self.pid is None:
            assert self.pending is not None
            self.process, self.baseline_rss = self.pending.forked()
            self.pid = self.process.pid
        return self.pid

    def _process(self) -> ProcessHandle:
        self._pid()
        assert self.process is not None
        return self.process

    # -- limits ---------------------------------------------------------------------------

    def _sample(self) -> None:
        tree = process_tree(self._pid())
        if not tree:
            return
        rss = 0
        descendants = self.out.descendants
        for pid in tree:
            if pid != self.pid and pid not in descendants:
                started = start_time(pid)
                if started is not None:
                    descendants[pid] = started
            rss += resident_bytes(pid)
        used = max(rss - self.baseline_rss, 0)
        self.out.peak_memory_bytes = max(self.out.peak_memory_bytes, used)
        if used > self.bounds.max_memory_bytes:
            self._stop("memory", used / MB)
            return
        stored, _empty, entries = directory_usage(self.workspace)
        self.out.storage_bytes = max(self.out.storage_bytes, stored)
        if entries > MAX_WORKSPACE_ENTRIES:
            self._stop("files", entries)
        elif stored > self.bounds.max_storage_bytes:
            self._stop("storage", stored / 1024)

    def _stop(self, reason: str, observed: float) -> None:
        self.out.killed_for = reason
        self.out.observed = observed
        self.out.limit_crossed_at = self.clock()
        self.kill()
        self.out.stopped_at = self.clock()
        self.out.stopped_at_unix = time.time()

    def _throttle(self, now: float, started: float) -> float:
        """SIGSTOP/SIGCONT the group so its CPU stays within its share of one core since it
        started (a budget, not a fixed duty cycle: on a loaded host it is not stopped for
        CPU it never got); returns when to look again."""
        share = self.bounds.cpu_percent / 100
        used = sum(cpu_seconds(pid) for pid in process_tree(self._pid()))
        earned_at = started + used / share  # when its share catches up with what it used
        if self._stopped:
            if now < earned_at:
                return earned_at
            self._signal_group(signal.SIGCONT)
            self._stopped = False
            return now + THROTTLE_SLICE_S
        if now < earned_at:
            self._signal_group(signal.SIGSTOP)
            self._stopped = True
            return earned_at
        # Running at full speed from now, it reaches its budget no sooner than this.
        return now + max(THROTTLE_SLICE_S, (share * (now - started) - used) / (1 - share))

    def _signal_group(self, signum: int) -> None:
        self._process().send_group(signum)

    def kill(self) -> None:
        """Kill the process group, the process (it may not lead a group yet) and any
        descendant seen escaping it that is still the process seen (same start time)."""
        process = self._process()
        process.send_group(signal.SIGKILL)
        process.send(signal.SIGKILL)
        for pid, started in self.out.descendants.items():
            if start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    # -- the loop -------------------------------------------------------------------------

    def _handle(self, message: Message) -> None:
        if isinstance(message, Log):
            self.out.logs.add(message.stream, message.text)
        elif isinstance(message, Started):
            self.out.started = message
            self.out.started_at = self.clock()
        elif isinstance(message, StorageRequest):
            raw: dict[str, Any] = (self.storage({"action": message.action, "key": message.key,
                                                 "value": message.value})
                                   if self.storage is not None else
                                   {"ok": False, "message": "no storage here"})
            # A sandbox waits for each reply (ctx.storage is synchronous): one that asks
            # and does not read them fills the socket, and is stopped within a second
            # (FrameDeadline), not left unsampled until its deadline.
            stopped = self._stopped  # throttled: a stopped process cannot read its reply
            if stopped:
                self._signal_group(signal.SIGCONT)
            try:
                send_by(self.fd, storage_reply(raw), time.monotonic() + STORAGE_REPLY_WAIT_S)
            finally:
                if stopped:  # and stopped again: its CPU share still holds
                    self._signal_group(signal.SIGSTOP)
        elif isinstance(message, FINAL):
            self.out.result = message
            self.out.finished_at = self.clock()

    def _read_output(self, output: OutputPipes, events: list[tuple[int, int]],
                     poller: select.poll) -> bool:
        """Read the output pipes that are ready; True when the channel is not among
        `events` (nothing else to do this round)."""
        channel_ready = False
        for fd, _event in events:
            if fd == self.fd:
                channel_ready = True
            elif not output.read(fd, self.out.logs):
                poller.unregister(fd)  # its end: the zygote is gone
        return not channel_ready

    def _final_frame_waiting(self, reader: FrameReader, *, ended: bool) -> bool:
        """Read what is on the channel for at most DRAIN_S (something the process started
        may keep writing) or, once the process has `ended`, all it left there first
        whatever the time; whether it held the final frame. A bad frame stops it as in the
        loop (the same bytes get the same error whenever they are read)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        queued = reader.bytes_read + (_queued_bytes(self.fd) if ended else 0)
        until = time.monotonic() + DRAIN_S
        while (self.out.result is None and self.out.killed_for is None and not reader.closed
               and (reader.bytes_read < queued or time.monotonic() < until)
               and poller.poll(0)):
            if self.pid is None:
                self._pid()
            self._read_frames(reader)
        return self.out.result is not None

    def _read_frames(self, reader: FrameReader) -> bool:
        """Handle the whole frames that have arrived (a partial one waits for the rest
        while the clocks keep running); False when the channel failed (its end)."""
        try:
            for message in reader.read():
                self._handle(message)
                if self.out.result is not None:
                    break  # anything after the final frame is not read
        except channel.FrameTooLarge as exc:
            self._stop("result_size", exc.size)
        except FrameDeadline:  # a storage reply the sandbox would not take
            self.out.protocol_error = (f"a storage reply was not read within "
                                       f"{STORAGE_REPLY_WAIT_S:g} s")
            self._stop("protocol", 0.0)
        except ValueError as exc:  # not JSON, not a message, a field mistyped
            self.out.protocol_error = str(exc)[:PROTOCOL_ERROR_CHARS]
            self._stop("protocol", 0.0)
        except OSError:
            return False
        return True

    def run(self) -> Supervision:
        """Supervise to the end; NotForked (nothing supervised, nothing to kill) when a
        pending run's zygote did not fork it."""
        throttle = self.bounds.cpu_percent < 100
        if throttle:
            self._pid()
        started = self.clock()
        try:
            return self._run(started, throttle)
        except NotForked:
            self.out.wall_s = self.clock() - started
            raise
        finally:
            if self.process is not None:
                self.process.close()

    def _run(self, started: float, throttle: bool) -> Supervision:
        deadline = started + self.bounds.timeout_s
        next_sample = started + SAMPLE_S
        next_throttle = started
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        output = self.output
        if output is not None:
            for fd in output.fds:
                poller.register(fd, select.POLLIN)
        channel_open = True
        reader = FrameReader(self.fd, max_bytes=self.max_frame_bytes)
        watching_exit: int | None = None
        """The watched process's pidfd once registered in the poller; -1 once its end was
        seen."""
        try:
            while self.out.result is None and self.out.killed_for is None:
                now = self.clock()
                if now >= deadline:
                    # A final frame already there came in time (a late sample, a loaded
                    # host): it is the outcome, not the timeout.
                    if channel_open and self._final_frame_waiting(reader, ended=False):
                        break
                    if self.out.killed_for is not None:
                        break
                    self._stop("timeout", (now - started) * 1000)
                    break
                if now >= next_sample:
                    self._sample()
                    if self.out.killed_for is not None:
                        break
                    # From the sample's end: a sample that ran late (a loaded host) must not
                    # be followed by another at once, starving the throttle and the channel.
                    now = self.clock()
                    next_sample = now + SAMPLE_S
                wake = min(deadline, next_sample)
                if throttle:
                    if now >= next_throttle:
                        next_throttle = self._throttle(now, started)
                    wake = min(wake, next_throttle)
                if not channel_open:
                    if output is not None:  # a run still writing must not block on them
                        output.poll_read(self.out.logs)
                    self._pid()
                    self.out.exit = self.reaper.reap(block=False)
                    if self.out.exit is not None:
                        break
                    time.sleep(min(max(wake - now, 0), 0.01))
                    continue
                exit_fd = self.process.fileno() if self.process is not None else None
                if exit_fd is not None and watching_exit is None:
                    # The process's end, seen even if something it started keeps the
                    # channel open (a setup's fork below the audit hook, say).
                    poller.register(exit_fd, select.POLLIN)
                    watching_exit = exit_fd
                events = poller.poll(max(wake - now, 0) * 1000)
                if not events:
                    continue
                if watching_exit is not None and watching_exit >= 0 and any(
                        fd == watching_exit for fd, _ in events):
                    poller.unregister(watching_exit)
                    watching_exit = -1  # seen: not watched again
                    # What it sent before it ended is the outcome; then its exit is read.
                    if not self._final_frame_waiting(reader, ended=True):
                        channel_open = False
                    continue
                if output is not None and self._read_output(output, events, poller):
                    continue  # only output: the channel has nothing yet
                if self.pid is None:  # the run wrote Forked before anything here
                    self._pid()
                if not self._read_frames(reader):
                    channel_open = False
                if reader.closed and self.out.result is None:
                    channel_open = False
        finally:
            self.out.wall_s = self.clock() - started
            if self.pid is None:
                self._pid()  # NotForked: nothing was forked, nothing to stop or reap
            if self._stopped:
                self._signal_group(signal.SIGCONT)
            # A setup that ended well leaves its zygote running; anything else is killed.
            if self.kill_after or self.out.result is None:
                self.kill()
                self.out.exit = self.out.exit or self.reaper.reap(block=True)
            if output is not None:  # a set-up zygote lives on: what it wrote so far
                output.drain(self.out.logs)
            if self.out.result is not None:
                # Once nothing of the run can still write (a run is reaped, and its
                # leftovers killed, before its zygote reports its exit): its final size, and
                # the listing the workspace's cleaning would make again.
                stored, self.out.workspace_empty, _entries = directory_usage(self.workspace)
                self.out.storage_bytes = max(self.out.storage_bytes, stored)
        return self.out
