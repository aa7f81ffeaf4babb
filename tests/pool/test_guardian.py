"""A pool process's zygote guardian (pool/sandbox/runtime/guardian.py, started by
guardians.py) with real zygotes: their parent, holding none of their ends; the end of
every zygote once its pool process is gone (after the teardown's grace; at once if
stopped), with no owner-records sweep running anywhere; bad requests answered, a dead
guardian replaced. What a dead zygote's tree left is killed: test_warm_sandboxes.py, in a
worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from pluginpool.pool.sandbox import guardians, warm
from pluginpool.pool.sandbox.launcher import ZygoteLauncher
from pluginpool.pool.sandbox.runner import standalone_plan
from pluginpool.pool.sandbox.runtime.leftovers import TEARDOWN_GRACE_S
from pluginpool.pool.tools.processes import wait_until
from pluginpool.tasks.spec import PluginSpec

PLUGINS = str(Path(__file__).resolve().parents[1] / "plugins")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def spec(entrypoint: str, **limits: Any) -> PluginSpec:
    return PluginSpec.model_validate({
        "id": entrypoint.split(":")[1].lower().replace("_", "-"), "name": entrypoint,
        "entrypoint": f"pp_testplugins.{entrypoint}",
        "resource_limits": {"setup_timeout_ms": 120_000, **limits}})


def start(entrypoint: str, warm_root: Path, **limits: Any) -> tuple[warm.WarmSandbox | None,
                                                                    Any]:
    plan = standalone_plan(spec(entrypoint, **limits), code_paths=(PLUGINS,),
                           warm_root=str(warm_root))
    return warm.start(ZygoteLauncher(code_paths=(PLUGINS,)), plan,
                      storage=lambda request: {"ok": False})


@pytest.fixture
def warm_root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pp-guardian-") as root:
        yield Path(root)


def working_under(root: Path) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cwd"]):
        if (proc.info["cwd"] or "").startswith(str(root)):
            found.append(proc.pid)
    return found


def test_zygotes_are_children_of_this_process_s_guardian_which_holds_none_of_their_ends(
        warm_root: Path) -> None:
    first, _ = start("basic:echo", warm_root)
    second, _ = start("basic:echo", warm_root)
    assert first is not None and second is not None
    try:
        guardian = guardians.guardian()
        for sandbox in (first, second):
            assert psutil.Process(sandbox.pid).ppid() == guardian.pid
        me = psutil.Process()
        assert guardian.pid not in {child.pid for child in me.children(recursive=True)}
        held = {os.readlink(f"/proc/{guardian.pid}/fd/{fd}")
                for fd in os.listdir(f"/proc/{guardian.pid}/fd")}
        sockets = {link for link in held if link.startswith("socket:")}
        assert len(sockets) == 1, held  # its request socket only, no control socket
        assert not any(link.startswith("pipe:") for link in held), held  # no output pipe
    finally:
        for sandbox in (first, second):
            sandbox.retire("test done")
            sandbox.finish()


OWNER = """
import sys
sys.path.insert(0, {tests!r})
from tests.pool.test_guardian import start
from pathlib import Path
start({entrypoint!r}, Path({root!r}), **{limits!r})
"""


def orphan(entrypoint: str, warm_root: Path, *, stopped: bool,
           **limits: Any) -> tuple[psutil.Process, float]:
    """A pool process stand-in sets `entrypoint` up; SIGKILLed mid-setup. The zygote and
    when its owner died."""
    code = OWNER.format(tests=str(Path(__file__).resolve().parents[2]),
                        entrypoint=entrypoint, root=str(warm_root), limits=limits)
    owner = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert wait_until(lambda: bool(working_under(warm_root)), timeout_s=30)
        zygote = psutil.Process(working_under(warm_root)[0])
        time.sleep(0.5)  # its setup is under way
        if stopped:
            os.kill(zygote.pid, signal.SIGSTOP)
    finally:
        owner.kill()
        owner.wait()
    return zygote, time.monotonic()


def test_a_zygote_that_ignores_its_watch_is_killed_after_the_grace(warm_root: Path) -> None:
    """Its setup ignores SIGIO and sleeps for ever: nothing in the zygote sees its pool
    process go. No sweep runs here (no worker): its guardian kills it once the grace its
    teardown would have had is over."""
    zygote, died = orphan("hostile_setup:UndoesTheWatch", warm_root, stopped=False)
    time.sleep(1)
    assert not gone(zygote.pid), "killed before its grace"
    assert wait_until(lambda: gone(zygote.pid), timeout_s=TEARDOWN_GRACE_S + 20)
    assert time.monotonic() - died >= TEARDOWN_GRACE_S - 1


def test_a_stopped_zygote_whose_owner_died_is_killed_at_once(warm_root: Path) -> None:
    zygote, _died = orphan("hostile_setup:Spins", warm_root, stopped=True,
                          max_cpu_percent=10)
    assert wait_until(lambda: gone(zygote.pid), timeout_s=TEARDOWN_GRACE_S - 2), \
        "the stopped zygote waited for a grace it cannot use"


def test_the_guardian_answers_bad_requests_and_lives(warm_root: Path) -> None:
    guardian = guardians.guardian()
    read_end, write_end = os.pipe()
    try:
        ends = [read_end, write_end, write_end]
        socket.send_fds(guardian.sock, [b"not json"], ends)
        assert b"launch_failed" in guardian.sock.recv(4096)
        socket.send_fds(guardian.sock, [b'{"op": "hello", "pid": 5, "rss_bytes": 1}'], ends)
        assert b"launch_failed" in guardian.sock.recv(4096)
        with pytest.raises(OSError, match="No such file"):
            guardian.launch(["/nonexistent/python"], {}, *ends)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert guardian.alive()
    sandbox, _ = start("basic:echo", warm_root)
    assert sandbox is not None
    sandbox.retire("test done")
    sandbox.finish()


def test_a_guardian_killed_is_replaced_and_its_zygotes_still_serve(warm_root: Path) -> None:
    before, _ = start("basic:echo", warm_root)
    assert before is not None
    try:
        old = guardians.guardian()
        os.kill(old.pid, signal.SIGKILL)
        assert wait_until(lambda: not old.alive(), timeout_s=10)
        after, _ = start("basic:echo", warm_root)
        assert after is not None
        new = guardians.guardian()
        assert new.pid != old.pid
        assert psutil.Process(after.pid).ppid() == new.pid
        assert not gone(before.pid)  # re-parented, still a zygote; the sweep covers it now
        after.retire("test done")
        after.finish()
    finally:
        before.retire("test done")
        before.finish()
