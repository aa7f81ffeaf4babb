"""Which pool process owns each zygote, kept beside the homes: what a pool process that died
left running is found and killed by any other (each one's housekeeper sweeps).

A zygote leaves the worker's tree: it has no parent to die with. It ends by itself when
its pool child goes (the end of its control socket, runtime/zygote.py's PoolChildWatch),
unless it cannot run (a setup stopped by its CPU throttle, SIGSTOP, when its pool child
was SIGKILLed stays stopped for good) or will not (plugin code in the zygote can undo any
watch of its own). So the pool child records each zygote it starts in
`<warm root>/.owners/`, where no zygote may write (its Landlock layer allows its home
only), and drops the record when it ends the zygote. A record whose owner has died names
a zygote to kill and a home to remove. Processes are told apart by pid and start time, so
a pid reused since is neither taken for a live owner nor killed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile

from pluginpool.pool.sandbox.process_handle import ProcessHandle, stat_fields

logger = logging.getLogger("pluginpool.sandbox.owners")

OWNERS_DIR = ".owners"
START_TIME_FIELD = 19
"""starttime, field 22 of /proc/<pid>/stat, in stat_fields' numbering (proc(5) minus 3)."""


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot); None when it is gone."""
    fields = stat_fields(pid)
    try:
        return int(fields[START_TIME_FIELD]) if fields else None
    except (IndexError, ValueError):
        return None


def record(warm_root: str, zygote_pid: int, home: str) -> str | None:
    """Record that this process owns the zygote; the record's path (None if it could not
    be written: the zygote then relies on its own watch alone)."""
    owner, zygote = os.getpid(), start_time(zygote_pid)
    if zygote is None:
        return None
    entry = {"owner_pid": owner, "owner_start": start_time(owner), "zygote_pid": zygote_pid,
             "zygote_start": zygote, "home": home}
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


def _same_process(pid: object, started: object) -> bool:
    return (isinstance(pid, int) and pid > 1 and isinstance(started, int)
            and start_time(pid) == started)


def sweep(warm_root: str) -> list[int]:
    """Kill every recorded zygote whose owner has died, remove its home and its record;
    the pids killed."""
    directory = os.path.join(warm_root, OWNERS_DIR)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    killed = []
    root = os.path.realpath(warm_root) + os.sep
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path) as source:
                entry = json.load(source)
            owner_alive = _same_process(entry.get("owner_pid"), entry.get("owner_start"))
        except (OSError, ValueError, AttributeError):
            continue  # being written (".new-"), or not a record
        if owner_alive:
            continue
        pid = entry.get("zygote_pid")
        if isinstance(pid, int) and _kill_if_same(pid, entry.get("zygote_start")):
            killed.append(pid)
        home = entry.get("home")
        if isinstance(home, str) and os.path.realpath(home).startswith(root):
            shutil.rmtree(home, ignore_errors=True)
        forget(path)
    return killed


def _kill_if_same(pid: int, started: object) -> bool:
    """SIGKILL the zygote and its process group, if `pid` is still the zygote recorded
    (checked after its pidfd is open: the pidfd then names that process for good)."""
    if pid <= 1 or pid == os.getpid():
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    handle = ProcessHandle(pid, pidfd)
    try:
        if not _same_process(pid, started):
            return False
        handle.send_group(signal.SIGKILL)  # its session: what its setup started
        handle.send(signal.SIGKILL)
        return True
    finally:
        handle.close()
