"""Which pool process owns each zygote, kept beside the homes: what a pool process that died
left running is found and killed by any other (each one's housekeeper sweeps).

A zygote leaves the worker's tree: it has no parent to die with. It ends by itself when
its pool child goes (the end of its control socket, runtime/zygote.py's PoolChildWatch),
unless it cannot run (a setup stopped by its CPU throttle, SIGSTOP, when its pool child
was SIGKILLed stays stopped for good) or will not (plugin code in the zygote can undo any
watch of its own); then its guardian (runtime/guardian.py) kills it. These records are
for what is left when the guardian is gone too (killed from outside, or never started:
no pidfds), and for the homes. So the pool child records each zygote it starts in
`<warm root>/.owners/`, where no zygote may write (its Landlock layer allows its home
only), and drops the record when it ends the zygote. A record whose owner has died names
a zygote to kill and a home to remove.

What the sweep trusts, and why:
- processes are told apart by pid and start time (a pid reused since is neither taken for
  a live owner nor killed), in one pid space: a record made in another (another host on a
  shared volume, another container's pid namespace) is left alone. One made by this host
  (its machine id and name) in an earlier boot, before this boot began, names only
  processes that are gone: its home and the record are removed, nothing is signalled;
- only a process that is certainly gone counts as gone (its /proc entry absent): a read
  that fails otherwise (out of descriptors) leaves the record for a later sweep;
- the warm root and the records must be this user's alone: the root's default path is
  predictable, and another user who made it first could otherwise write records naming
  any of this user's processes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import stat
import tempfile
import time
from dataclasses import dataclass, field

from pluginpool.pool.sandbox.process_handle import ProcessHandle, stat_fields
from pluginpool.pool.sandbox.runtime import leftovers

logger = logging.getLogger("pluginpool.sandbox.owners")

OWNERS_DIR = ".owners"
PGRP_FIELD = 2
"""pgrp, field 5 of /proc/<pid>/stat, in the numbering after the command name."""
START_TIME_FIELD = 19
"""starttime, field 22 of /proc/<pid>/stat, in the numbering after the command name."""
PID_MAX = 1 << 22
"""The kernel's largest pid_max: a record's pid above it is not a pid."""
TEARDOWN_GRACE_S = leftovers.TEARDOWN_GRACE_S
"""How long a zygote whose owner died may go on (its teardown) before a sweep kills it: the
same grace its guardian gives it, which kills it first unless it is gone too."""
JUNK_AFTER_S = 60.0
"""A file in the records' directory that is not a record (a write cut short) this old is
removed."""


class Unknown(Exception):
    """Whether the process lives could not be read (not that it is gone)."""


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (process_handle.stat_fields'
    numbering); None when the process is gone. Unknown if it could not be read for another
    reason: unlike stat_fields, a failed read is not taken for a process gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return None
        raise Unknown(str(exc)) from exc
    try:
        raw = os.read(fd, 4096)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return None
        raise Unknown(str(exc)) from exc
    finally:
        os.close(fd)
    fields = raw.rsplit(b")", 1)[-1].split()
    if len(fields) <= START_TIME_FIELD or not fields[START_TIME_FIELD].isdigit():
        raise Unknown(f"unreadable stat of {pid}")
    return fields


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot); None when it is gone. Unknown if
    its /proc entry could not be read for another reason."""
    fields = _stat(pid)
    return None if fields is None else int(fields[START_TIME_FIELD])


def pid_space() -> str:
    """This boot and pid namespace: a pid and start time mean one process only within it.
    "" (nothing recorded, nothing swept) where /proc is not this namespace's own (a pid
    namespace without its /proc mounted: /proc/<pid> would name other processes)."""
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return ""
        with open("/proc/sys/kernel/random/boot_id") as source:
            boot = source.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def host_id() -> str:
    """This host, as far as a shared volume can tell: its machine id and name. A record of
    this host's from another boot is from before a reboot; another host's may be live.
    "" without a machine id (many container images): a bare host name is not trusted to
    tell hosts apart, and no record is then taken for one of this host's."""
    machine = ""
    with contextlib.suppress(OSError), open("/etc/machine-id") as source:
        machine = source.read().strip()
    return f"{machine}/{os.uname().nodename}" if machine else ""


def record(warm_root: str, zygote_pid: int, home: str) -> str | None:
    """Record that this process owns the zygote; the record's path (None if it could not
    be written or the processes cannot be told apart: the zygote then relies on its own
    watch alone)."""
    try:
        owner, zygote = os.getpid(), start_time(zygote_pid)
        owner_start = start_time(owner)
    except Unknown:
        return None
    space = pid_space()
    if zygote is None or owner_start is None or not space:
        return None
    entry = {"owner_pid": owner, "owner_start": owner_start, "zygote_pid": zygote_pid,
             "zygote_start": zygote, "home": home, "pid_space": space, "host": host_id()}
    directory = os.path.join(warm_root, OWNERS_DIR)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".new-")
        with os.fdopen(fd, "w") as out:
            json.dump(entry, out)
        path = os.path.join(directory, f"{zygote_pid}-{zygote}.json")
        os.replace(temporary, path)
    except OSError as exc:
        logger.warning("could not record the owner of zygote %d: %s", zygote_pid, exc)
        return None
    return path


def forget(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _private(path: str) -> bool:
    """A directory (not a symlink) of this user's that no one else may write to."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
            and not info.st_mode & 0o022)


@dataclass
class Swept:
    killed: list[int] = field(default_factory=list)
    """The zygotes killed."""
    waiting: int = 0
    """Orphans left running for their teardown's grace: sweep again after it."""
    previous_boot: int = 0
    """Records of this host's made before this boot (their homes removed)."""


def now_s() -> float:
    """The sweep's clock: time since boot (records are judged only within their boot),
    which no wall-clock step moves."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def sweep(warm_root: str, *, now: float | None = None) -> Swept:
    """Kill every recorded zygote whose owner has died, remove its home and its record.

    A zygote whose owner died may be running its teardown (close(), up to
    TEARDOWN_GRACE_S alone): one that is stopped is killed at once (it can do nothing),
    any other only once its record has been marked orphaned that long (or at once if the
    mark cannot be written: a full disk must not keep it alive)."""
    directory = os.path.join(warm_root, OWNERS_DIR)
    swept = Swept()
    if not (_private(warm_root) and _private(directory)):
        if os.path.lexists(directory):
            logger.warning("not sweeping %s: it is not this user's alone", directory)
        return swept
    try:
        names = os.listdir(directory)
    except OSError:
        return swept
    space = pid_space()
    now = now_s() if now is None else now
    for name in names:
        path = os.path.join(directory, name)
        try:
            entry = _read(path)
        except OSError:
            continue  # could not be opened now (out of descriptors): a later sweep will
        if entry is None:
            _drop_if_old(path)  # opened, and not a record
            continue
        if not space or entry.get("pid_space") != space:
            if space and _before_this_boot(path, entry, space):
                _remove_home(warm_root, entry.get("home"))
                forget(path)
                swept.previous_boot += 1
            continue  # another host or namespace: its processes are not ours to judge
        try:
            if _same_process(entry.get("owner_pid"), entry.get("owner_start")):
                continue
            orphaned_at = entry.get("orphaned_at")
            if not isinstance(orphaned_at, (int, float)) or orphaned_at > now:
                if (not _stopped(entry.get("zygote_pid"), entry.get("zygote_start"))
                        and _mark_orphaned(path, entry, now)):
                    swept.waiting += 1  # maybe tearing down: after the grace
                    continue
            elif now - orphaned_at < TEARDOWN_GRACE_S:
                swept.waiting += 1
                continue
            outcome = _end_zygote(entry.get("zygote_pid"), entry.get("zygote_start"))
        except Unknown:
            continue  # a later sweep will know
        if outcome is not None:
            swept.killed.append(outcome)
            logger.warning("killed zygote %d: the pool process that owned it is gone", outcome)
        else:
            _kill_left_in(entry.get("home"), entry.get("zygote_pid"))
        _remove_home(warm_root, entry.get("home"))
        forget(path)
    if swept.previous_boot:
        logger.info("removed %d warm sandbox homes left from before this host rebooted",
                    swept.previous_boot)
    return swept


def _before_this_boot(path: str, entry: dict[str, object], space: str) -> bool:
    """The record is this host's, of another boot, and was written before this boot began:
    every process it names is gone. A record of another host (a shared volume) or of this
    boot's other pid namespaces (another container) may name live processes: False."""
    recorded, host = entry.get("pid_space"), host_id()
    if not isinstance(recorded, str) or not host or entry.get("host") != host:
        return False
    if recorded.split("/", 1)[0] == space.split("/", 1)[0]:
        return False  # this boot: another pid namespace
    try:
        written = os.lstat(path).st_mtime
    except OSError:
        return False
    return written < time.time() - now_s()


def _stopped(pid: object, started: object) -> bool:
    """The zygote recorded is stopped (SIGSTOP: it can run nothing, teardown included),
    or gone, or only its exit status is left (nothing to wait for)."""
    if not (isinstance(pid, int) and 1 < pid < PID_MAX):
        return True
    fields = _stat(pid)
    return (fields is None or int(fields[START_TIME_FIELD]) != started
            or fields[0] in (b"T", b"t", b"Z", b"X"))


def _mark_orphaned(path: str, entry: dict[str, object], now: float) -> bool:
    """Note when the owner was first found gone (rewritten whole, as record() writes);
    False if it could not be written."""
    try:
        fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".new-")
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
            raise Unknown(str(exc)) from exc  # this process's shortage: try later
        return False
    try:
        with os.fdopen(fd, "w") as out:
            json.dump({**entry, "orphaned_at": now}, out)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        return False
    return True


def _read(path: str) -> dict[str, object] | None:
    """A record, opened without following a link and only if it is this user's; None for
    a file that is not one. OSError if it could not be opened (it may be one)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symbolic link: not a record
            return None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return None
        entry = json.loads(os.read(fd, 65536))
    except ValueError:
        return None
    finally:
        os.close(fd)
    return entry if isinstance(entry, dict) else None


def _drop_if_old(path: str) -> None:
    with contextlib.suppress(OSError):
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode) and time.time() - info.st_mtime > JUNK_AFTER_S:
            os.unlink(path)


def _same_process(pid: object, started: object) -> bool:
    """The process recorded lives (Unknown if that cannot be read now)."""
    if not (isinstance(pid, int) and 1 < pid < PID_MAX and isinstance(started, int)):
        return False
    return start_time(pid) == started


def _end_zygote(pid: object, started: object) -> int | None:
    """SIGKILL the zygote and its process group if `pid` is still the zygote recorded
    (checked after its pidfd is open: the pidfd then names that process for good); its pid
    if killed, None if it was gone already. Unknown when that cannot be told."""
    if not (isinstance(pid, int) and 1 < pid < PID_MAX and isinstance(started, int)) \
            or pid == os.getpid():
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EINVAL):  # the pid is a thread's now, not a
            return None  # process's: a zygote (a thread-group leader) it is not
        raise Unknown(str(exc)) from exc
    handle = ProcessHandle(pid, pidfd)
    try:
        if start_time(pid) != started:
            return None  # gone, and its pid taken by another process since
        handle.send_group(signal.SIGKILL)  # its session: what its setup started
        handle.send(signal.SIGKILL)
        return pid
    finally:
        handle.close()


def _kill_left_in(home: object, group: object) -> None:
    """What a zygote that is gone left behind (a teardown cut at its bound after starting
    processes): processes of its group still working in its home. The group alone is not
    enough (a pid freed since may lead, or have led, another group: a worker started with
    --detach runs in one whose leader is gone); a home is unique (mkdtemp), and only the
    zygote's own processes work there. Never this process's own group or session."""
    if not (isinstance(home, str) and isinstance(group, int) and 1 < group < PID_MAX) \
            or group in (os.getpgrp(), os.getsid(0)):
        return
    inside = os.path.realpath(home) + os.sep
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    def left_behind(pid: int) -> bool:
        fields = stat_fields(pid)
        try:
            return (fields is not None and int(fields[PGRP_FIELD]) == group
                    and (os.readlink(f"/proc/{pid}/cwd") + os.sep).startswith(inside))
        except (OSError, ValueError):
            return False

    for name in names:
        if not name.isdigit() or int(name) == os.getpid() or not left_behind(int(name)):
            continue  # a pidfd only for the few that match: not one per process on the host
        pid = int(name)
        try:
            handle = ProcessHandle(pid, os.pidfd_open(pid))
        except OSError:
            continue
        try:
            if left_behind(pid):  # still: the pidfd now names that process for good
                handle.send(signal.SIGKILL)
        finally:
            handle.close()


def _remove_home(warm_root: str, home: object) -> None:
    """A recorded home, only if it is a directory directly under the warm root (not the
    root itself, nor the records)."""
    if not isinstance(home, str):
        return
    root = os.path.realpath(warm_root)
    if (os.path.dirname(home) != root
            or os.path.basename(home) in ("", ".", "..", OWNERS_DIR) or os.path.islink(home)):
        return
    shutil.rmtree(home, ignore_errors=True)
