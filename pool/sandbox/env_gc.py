"""Removing per-revision environments nobody uses any more, so a host's disk does not fill
as plugins and their revisions come and go.

An environment (`<envs>/<key>/`, environments.py) is removed when all of these hold:
- no registered plugin's current revision resolves to it (those stay whatever their age);
- it has not been used for `keep_s`: its `used` marker (touched whenever a pool process
  looks it up to start a warm sandbox, at most once a minute per process) is older;
- no install or removal of it is under way: the sweep takes the key's install lock
  (env_install.py) without waiting, and skips the environment if it is held.

Removal renames the directory out of the way first (one atomic step, after which no lookup
finds it: a later job installs it again), then deletes it. Scratch directories of
installers killed mid-way are removed once older than the install timeout.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

logger = logging.getLogger("pluginpool.sandbox.environments")

USED = "used"
"""The marker whose mtime is the environment's last use."""
KEY_PATTERN = re.compile(r"[0-9a-f]{32}")
TOUCH_EVERY_S = 60.0


def mark_used(envs_dir: str, key: str) -> None:
    """Record that the environment was used now (its `used` marker's mtime)."""
    path = os.path.join(envs_dir, key, USED)
    with contextlib.suppress(OSError):
        try:
            os.utime(path)
        except FileNotFoundError:
            with open(path, "a", encoding="utf-8"):
                pass


def last_used(envs_dir: str, key: str) -> float:
    """When the environment was last used: its marker, else when it was built."""
    for name in (USED, ""):
        with contextlib.suppress(OSError):
            return os.stat(os.path.join(envs_dir, key, name)).st_mtime
    return 0.0


@dataclass
class SweepReport:
    removed: list[str] = field(default_factory=list)
    kept_current: int = 0
    kept_recent: int = 0
    kept_busy: int = 0
    scratch_removed: int = 0


def stale_keys(envs_dir: str, *, keep_s: float, now: float | None = None) -> list[str]:
    """Environments unused for `keep_s` (before the registry is asked which are current)."""
    now = time.time() if now is None else now
    try:
        names = os.listdir(envs_dir)
    except OSError:
        return []
    return [name for name in names if KEY_PATTERN.fullmatch(name)
            and os.path.isdir(os.path.join(envs_dir, name))
            and now - last_used(envs_dir, name) >= keep_s]


def sweep(envs_dir: str, *, keep_s: float, current: Iterable[str], scratch_max_age_s: float,
          now: float | None = None) -> SweepReport:
    """Remove the environments described in the module docstring; what was done."""
    now = time.time() if now is None else now
    report = SweepReport()
    current_keys = set(current)
    for key in stale_keys(envs_dir, keep_s=keep_s, now=now):
        if key in current_keys:
            report.kept_current += 1
            continue
        outcome, used = _remove_unless_busy(envs_dir, key, keep_s=keep_s, now=now)
        if outcome == "busy":
            report.kept_busy += 1
        elif outcome == "removed":
            report.removed.append(key)
            logger.info("removed environment %s (unused for %.0f s, no registered revision "
                        "uses it)", key, now - used)
        else:
            report.kept_recent += 1
    report.scratch_removed = _remove_old_scratch(envs_dir, max_age_s=scratch_max_age_s,
                                                 now=now)
    return report


@contextlib.contextmanager
def _lock_if_free(envs_dir: str, key: str) -> Iterator[bool]:
    """The key's install lock (env_install.py) taken without waiting: False if an install
    or another sweep holds it."""
    fd = os.open(os.path.join(envs_dir, f"{key}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def _remove_unless_busy(envs_dir: str, key: str, *, keep_s: float,
                        now: float) -> tuple[str, float]:
    """("removed", its last use), ("recent", ...) if used again meanwhile (or it cannot be
    moved), or ("busy", 0) if an install or another sweep holds its lock."""
    with _lock_if_free(envs_dir, key) as locked:
        if not locked:
            return "busy", 0.0
        used = last_used(envs_dir, key)
        if now - used < keep_s:
            return "recent", used
        target = os.path.join(envs_dir, key)
        doomed = os.path.join(envs_dir, f".{key}.removing-{os.getpid()}")
        try:
            os.rename(target, doomed)
        except OSError:
            return "recent", used
        shutil.rmtree(doomed, ignore_errors=True)
        return "removed", used


def _remove_old_scratch(envs_dir: str, *, max_age_s: float, now: float) -> int:
    """Scratch and half-removed directories (`.<key>.*`) older than `max_age_s` whose key
    no installer holds (an install in progress holds its key's lock)."""
    removed = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(envs_dir):
            key = entry.name[1:].partition(".")[0]
            if not entry.name.startswith(".") or not KEY_PATTERN.fullmatch(key) \
                    or not entry.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                if now - entry.stat(follow_symlinks=False).st_mtime < max_age_s:
                    continue
                with _lock_if_free(envs_dir, key) as locked:
                    if locked:
                        shutil.rmtree(entry.path, ignore_errors=True)
                        removed += 1
    return removed
