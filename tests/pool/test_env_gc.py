"""The sweep of unused environments on a real directory tree, with real locks: what it
removes, and what it leaves (current revisions, recent use, an install under way)."""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from pluginpool.pool.sandbox import env_gc
from pluginpool.pool.sandbox.environments import Environments, PackageSources, environment_key
from pluginpool.tasks.spec import PluginSpec

DAY = 86_400.0


def environment(envs: Path, key: str, *, used_ago_s: float) -> Path:
    path = envs / key
    (path / "site").mkdir(parents=True)
    env_gc.mark_used(str(envs), key)
    when = time.time() - used_ago_s
    os.utime(path / env_gc.USED, (when, when))
    return path


def test_only_stale_unregistered_idle_environments_are_removed(tmp_path: Path) -> None:
    envs = tmp_path / "envs"
    stale = environment(envs, "a" * 32, used_ago_s=2 * DAY)
    current = environment(envs, "b" * 32, used_ago_s=2 * DAY)
    recent = environment(envs, "c" * 32, used_ago_s=60)
    busy = environment(envs, "d" * 32, used_ago_s=2 * DAY)
    scratch = envs / f".{'e' * 32}.x1y2"
    scratch.mkdir()
    os.utime(scratch, (time.time() - DAY, time.time() - DAY))
    installing = envs / f".{'d' * 32}.k9"  # the busy key's installer, still at work
    installing.mkdir()
    os.utime(installing, (time.time() - DAY, time.time() - DAY))
    held = os.open(envs / f"{busy.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)  # as env_install holds it while installing
    try:
        report = env_gc.sweep(str(envs), keep_s=DAY, current={current.name},
                              scratch_max_age_s=3_600)
    finally:
        os.close(held)
    assert report.removed == [stale.name] and not stale.exists()
    assert current.is_dir() and recent.is_dir() and busy.is_dir()
    assert (report.kept_current, report.kept_busy) == (1, 1)
    assert not scratch.exists() and installing.is_dir() and report.scratch_removed == 1
    assert not [p for p in envs.iterdir() if ".removing-" in p.name]


def test_use_is_marked_and_an_environment_without_a_marker_ages_from_its_build(
        tmp_path: Path) -> None:
    envs = tmp_path / "envs"
    built = envs / ("f" * 32)
    (built / "site").mkdir(parents=True)
    old = time.time() - 2 * DAY
    os.utime(built, (old, old))
    assert env_gc.stale_keys(str(envs), keep_s=DAY) == [built.name]
    env_gc.mark_used(str(envs), built.name)
    assert env_gc.stale_keys(str(envs), keep_s=DAY) == []
    assert env_gc.stale_keys(str(envs / "missing"), keep_s=DAY) == []


def test_a_run_on_a_warm_sandbox_marks_its_environment_used(tmp_path: Path) -> None:
    """A warm sandbox can serve runs for days after it started: each run (at most once a
    minute per process) keeps its environment from being swept under it."""
    spec = PluginSpec.model_validate({"id": "busy", "name": "busy", "entrypoint": "m:run",
                                      "requires": {"packages": ["ppdemo_dep==1.0"]}})
    envs = Environments(tmp_path, sources=PackageSources(index_url="none"),
                        interpreter=sys.executable, install_timeout_s=60)
    key = environment_key(spec, sources=envs.sources, interpreter=envs.interpreter)
    environment(envs.envs_dir, key, used_ago_s=2 * DAY)
    assert env_gc.stale_keys(str(envs.envs_dir), keep_s=DAY) == [key]
    envs.note_use(spec)
    assert env_gc.stale_keys(str(envs.envs_dir), keep_s=DAY) == []

