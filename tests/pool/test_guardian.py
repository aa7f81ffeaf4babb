"""A pool process's zygote guardian (pool/sandbox/runtime/guardian.py, started by
guardians.py) with real zygotes: their parent, holding none of their ends; the end of
every zygote once its pool process is gone (after the teardown's grace; at once if
stopped), with no owner-records sweep running anywhere; bad requests answered, a dead
guardian replaced. What a dead zygote's tree left is killed: test_warm_sandboxes.py, in a
worker."""

from __future__ import annotations

import contextlib
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
        for pid in working_under(Path(root)):  # a test that failed: its zygotes, by pid
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


@pytest.fixture(autouse=True, scope="module")
def _own_guardian_stopped() -> Iterator[None]:
    """This test process's guardian, killed (by its pidfd) when the module is done."""
    yield
    guardians.forget(kill=True)


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


def ignores_sigio(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        ignored = next(line for line in status if line.startswith("SigIgn:"))
    return bool(int(ignored.split()[1], 16) & (1 << (signal.SIGIO - 1)))


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
        if entrypoint.endswith("UndoesTheWatch"):  # until its setup ignores SIGIO
            assert wait_until(lambda: ignores_sigio(zygote.pid), timeout_s=30)
        time.sleep(0.5)  # its setup is under way
        if stopped:  # the owner first: its throttle must not continue the zygote again
            os.kill(owner.pid, signal.SIGSTOP)
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
        for argv, env in (([], {}), ([""], {}), (["/bin/true", 5], {}),
                          (["/bin/true"], {"A": 1})):
            with pytest.raises(OSError, match=r"TypeError|ProtocolError"):
                guardian.launch(argv, env, *ends)  # type: ignore[arg-type]
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


def test_a_request_socket_closed_ends_the_launches_not_the_guarding(warm_root: Path) -> None:
    """The pool process lets its guardian go without dying (it did not answer in time):
    the guardian's zygotes still serve that pool process, so they are not killed, not even
    once the grace is over; it exits when its last zygote has."""
    sandbox, _ = start("basic:echo", warm_root)
    assert sandbox is not None
    try:
        old = guardians.guardian()
        guardian = psutil.Process(old.pid)
        guardians.forget()  # its socket closed, the process left alone
        time.sleep(TEARDOWN_GRACE_S + 1)
        assert not gone(sandbox.pid) and guardian.is_running()
    finally:
        sandbox.retire("test done")
        sandbox.finish()
    assert wait_until(lambda: gone(guardian.pid), timeout_s=10), "it outlived its zygotes"


def test_an_answer_to_a_launch_given_up_on_is_not_taken_for_the_next(warm_root: Path) -> None:
    """A launch interrupted after it was sent (Celery's soft limit) leaves its answer on the
    socket; the next launch skips it by its reference and gets its own."""
    guardian = guardians.guardian()
    read_end, write_end = os.pipe()
    try:
        # Refused (no program), so its answer is a failure the next launch must not take.
        stale = b'{"op": "launch", "ref": 999999, "argv": [], "env": {}}'
        socket.send_fds(guardian.sock, [stale], [read_end, write_end, write_end])
        pid = guardian.launch(["/bin/true"], {}, read_end, write_end, write_end)
        assert pid > 0
    finally:
        os.close(read_end)
        os.close(write_end)
    assert wait_until(lambda: not psutil.pid_exists(pid), timeout_s=10)  # reaped by it
    sandbox, _ = start("basic:echo", warm_root)
    assert sandbox is not None
    sandbox.retire("test done")
    sandbox.finish()


def test_without_a_guardian_zygotes_are_still_started(warm_root: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Where none can run (no pidfds: an old kernel, a container's profile), the pool
    process starts its zygotes itself, detached as before guardians."""
    def refused() -> guardians.GuardianProcess:
        raise guardians.CannotGuard("refused here")

    monkeypatch.setattr(guardians, "start", refused)
    monkeypatch.setattr(guardians, "_ours", {})
    monkeypatch.setattr(guardians, "_impossible", set())
    sandbox, _ = start("basic:echo", warm_root)
    assert sandbox is not None
    try:
        assert psutil.Process(sandbox.pid).ppid() not in (os.getpid(), 0)
        assert os.getpid() in guardians._impossible  # not tried at every start
    finally:
        sandbox.retire("test done")
        sandbox.finish()


def test_a_guardian_that_does_not_answer_is_killed_and_the_start_fails_typed(
        warm_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It takes the launch and never answers (stuck): the start fails typed after
    REPLY_TIMEOUT_S, is not retried with the same descriptors (the guardian might yet start
    a zygote on them: two zygotes on one control socket), the guardian is killed, and the
    next start gets a new one."""
    from pluginpool.pool.sandbox.launcher import ZygoteStartError

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stuck = subprocess.Popen(["sleep", "600"])  # stands in for it: it never answers
    try:
        ours.settimeout(guardians.REPLY_TIMEOUT_S)
        monkeypatch.setitem(guardians._ours, os.getpid(), guardians.GuardianProcess(
            pid=stuck.pid, sock=ours, pidfd=os.pidfd_open(stuck.pid)))
        started = time.monotonic()
        with pytest.raises(ZygoteStartError, match="did not answer"):
            start("basic:echo", warm_root)
        assert time.monotonic() - started < guardians.REPLY_TIMEOUT_S + 10
        assert stuck.wait(10) == -signal.SIGKILL  # killed through its pidfd
        assert b'"launch"' in theirs.recv(65536)  # the one launch it got
        theirs.settimeout(5)
        assert theirs.recv(65536) == b""  # then the end of the socket: no second one
    finally:
        stuck.kill()
        stuck.wait()
        theirs.close()
    sandbox, _ = start("basic:echo", warm_root)
    assert sandbox is not None
    assert psutil.Process(sandbox.pid).ppid() == guardians.guardian().pid
    sandbox.retire("test done")
    sandbox.finish()


def test_a_stopped_guardian_is_replaced_before_a_launch_is_sent(warm_root: Path) -> None:
    """Stopped (a setup could stop its parent where Landlock cannot scope signals), it
    would take the launch and never answer: found stopped before anything is sent, it is
    killed and another started, and the start succeeds."""
    old = guardians.guardian()
    os.kill(old.pid, signal.SIGSTOP)
    try:  # a signal is delivered when its target next runs: until then it is not stopped
        assert wait_until(lambda: psutil.Process(old.pid).status() == psutil.STATUS_STOPPED,
                          timeout_s=10)
        sandbox, _ = start("basic:echo", warm_root)
        assert sandbox is not None
        assert psutil.Process(sandbox.pid).ppid() == guardians.guardian().pid != old.pid
        assert wait_until(lambda: gone(old.pid), timeout_s=10), "the stopped one lives on"
        sandbox.retire("test done")
        sandbox.finish()
    finally:
        with contextlib.suppress(OSError):
            os.kill(old.pid, signal.SIGKILL)


CHAIN = """
import os, sys, time
log = sys.argv[1]
if os.fork() == 0:  # a chain of sessions: each link forks the next and exits
    while True:
        with open(log, "a") as out:
            out.write(f"{os.getpid()}\\n")
        if os.fork() > 0:
            os._exit(0)
        os.setsid()
        pass
time.sleep(0.5)
os._exit(0)  # its "zygote" ends; the chain, re-parented to the guardian, goes on
"""


def test_a_chain_of_forks_left_by_a_dead_zygote_cannot_outrun_the_guardian(
        tmp_path: Path) -> None:
    """Each link of the chain forks the next in a session of its own and exits at once
    (alone, about 900 links a second, for ever). The guardian stops the whole tree before
    it kills it, so that a chain cannot outrun it; on this machine killing one generation
    at a time also caught this chain, so the test shows the chain ends, not which way."""
    log = tmp_path / "links"
    log.touch()
    guardian = guardians.guardian()
    read_end, write_end = os.pipe()
    try:
        zygote = guardian.launch([sys.executable, "-c", CHAIN, str(log)], {}, read_end,
                                 write_end, write_end)
    finally:
        os.close(read_end)
        os.close(write_end)

    def links() -> list[int]:
        return [int(line) for line in log.read_text().split()]

    def chain_over() -> bool:  # no new link for a second, and the last one gone
        before = len(links())
        time.sleep(1)
        found = links()
        return len(found) == before and not psutil.pid_exists(found[-1])

    try:
        assert wait_until(lambda: len(links()) > 10, timeout_s=10)
        assert wait_until(lambda: not psutil.pid_exists(zygote), timeout_s=10)
        assert wait_until(chain_over, timeout_s=20), "the chain outran it"
    finally:
        for _round in range(100):  # it failed: the chain is stopped link by link, by pid
            last = links()[-1]
            with contextlib.suppress(OSError):
                os.kill(last, signal.SIGKILL)
            if not psutil.pid_exists(last) and last == links()[-1]:
                break
            time.sleep(0.01)


def test_guardian_starts_that_keep_failing_are_not_tried_at_every_zygote_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each try costs an interpreter's start: after 3 failures in a row, none for a while
    (the launcher then starts zygotes itself, quietly)."""
    tries: list[int] = []

    def failing() -> guardians.GuardianProcess:
        tries.append(1)
        raise guardians.GuardianUnavailable("it did not say hello")

    monkeypatch.setattr(guardians, "start", failing)
    monkeypatch.setattr(guardians, "_ours", {})
    monkeypatch.setattr(guardians, "_failed", {})
    for _ in range(guardians.FAILURES_BEFORE_BACKOFF):
        with pytest.raises(guardians.GuardianUnavailable):
            guardians.guardian()
    with pytest.raises(guardians.CannotGuard, match="trying again later"):
        guardians.guardian()
    assert len(tries) == guardians.FAILURES_BEFORE_BACKOFF


def test_a_guardian_let_go_twice_closes_its_descriptors_once() -> None:
    """A number closed may be reused at once by another thread's pidfd or socket: closing
    it again (or signalling through it) would hit that one."""
    guardian = guardians.start()
    pidfd = guardian.pidfd
    guardian.close(kill=True)
    assert guardian.pidfd == -1
    reused = os.open(os.devnull, os.O_RDONLY)  # most likely the number just freed
    try:
        guardian.close(kill=True)
        os.fstat(reused)  # still open
    finally:
        os.close(reused)
    assert pidfd >= 0
