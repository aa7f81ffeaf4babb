"""The owners' records of zygotes (pool/sandbox/owners.py), with real processes: a zygote
whose owner died is killed with its process group and its home removed; one whose owner
lives, or whose pid now names another process, is left alone."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pluginpool.pool.sandbox import owners
from pluginpool.pool.tools.processes import wait_until


def sleeper() -> subprocess.Popen[bytes]:
    """A stand-in zygote: its own session (as a zygote), with a child in its group; it
    prints once the child exists."""
    return subprocess.Popen([sys.executable, "-c", "import os, time\n"
                             "if os.fork() == 0:\n    time.sleep(120)\n"
                             "print('forked', flush=True)\ntime.sleep(120)"],
                            start_new_session=True, stdout=subprocess.PIPE)


def write(warm_root: Path, **entry: object) -> Path:
    directory = warm_root / owners.OWNERS_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    entry.setdefault("pid_space", owners.pid_space())
    path = directory / f"{entry['zygote_pid']}-{entry['zygote_start']}.json"
    path.write_text(json.dumps(entry))
    return path


def dead_pid() -> tuple[int, int]:
    """The pid and start time of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    started = owners.start_time(proc.pid)
    assert started is not None
    proc.wait()
    return proc.pid, started


@pytest.fixture
def zygote() -> Iterator[subprocess.Popen[bytes]]:
    proc = sleeper()
    assert proc.stdout is not None
    assert select.select([proc.stdout], [], [], 30)[0], "the stand-in zygote did not fork"
    assert proc.stdout.readline() == b"forked\n"
    group = os.getpgid(proc.pid)
    yield proc
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


def test_a_zygote_whose_owner_died_is_killed_with_its_group_and_home(
        tmp_path: Path, zygote: subprocess.Popen[bytes]) -> None:
    home = tmp_path / "plugin-abc"
    (home / "setup").mkdir(parents=True)
    owner, owner_start = dead_pid()
    group = os.getpgid(zygote.pid)
    record = write(tmp_path, owner_pid=owner, owner_start=owner_start, zygote_pid=zygote.pid,
                   zygote_start=owners.start_time(zygote.pid), home=str(home))
    # Running: maybe tearing down. Marked the first time, killed once the grace is over.
    assert owners.sweep(str(tmp_path)).waiting == 1
    assert zygote.poll() is None and home.exists()
    assert json.loads(record.read_text())["orphaned_at"] > 0
    later = owners.now_s() + owners.TEARDOWN_GRACE_S + 1
    assert owners.sweep(str(tmp_path), now=later).killed == [zygote.pid]
    assert zygote.wait(timeout=10) == -9
    assert wait_until(lambda: not _group_alive(group), timeout_s=10), "its group lives on"
    assert not home.exists() and not record.exists()


def test_a_stopped_zygote_whose_owner_died_is_killed_at_once(
        tmp_path: Path, zygote: subprocess.Popen[bytes]) -> None:
    """Stopped, it can run no teardown: nothing to wait for."""
    home = tmp_path / "plugin-stopped"
    home.mkdir()
    owner, owner_start = dead_pid()
    os.kill(zygote.pid, signal.SIGSTOP)
    assert wait_until(lambda: psutil.Process(zygote.pid).status() == psutil.STATUS_STOPPED,
                      timeout_s=10)
    write(tmp_path, owner_pid=owner, owner_start=owner_start, zygote_pid=zygote.pid,
          zygote_start=owners.start_time(zygote.pid), home=str(home))
    assert owners.sweep(str(tmp_path)).killed == [zygote.pid]
    assert zygote.wait(timeout=10) == -9
    assert not home.exists()


def test_a_zygote_whose_owner_lives_is_left_alone(tmp_path: Path,
                                                  zygote: subprocess.Popen[bytes]) -> None:
    home = tmp_path / "plugin-live"
    home.mkdir()
    path = owners.record(str(tmp_path), zygote.pid, str(home))  # owned by this process
    assert path is not None
    assert owners.sweep(str(tmp_path)).killed == []
    assert zygote.poll() is None and home.exists() and Path(path).exists()
    owners.forget(path)
    assert not Path(path).exists()


def test_a_pid_that_names_another_process_now_is_not_killed(
        tmp_path: Path, zygote: subprocess.Popen[bytes]) -> None:
    """The record's start time is not the process's: its pid was reused."""
    owner, owner_start = dead_pid()
    started = owners.start_time(zygote.pid)
    assert started is not None
    record = write(tmp_path, owner_pid=owner, owner_start=owner_start, zygote_pid=zygote.pid,
                   zygote_start=started - 1, home=str(tmp_path / "gone"))
    assert owners.sweep(str(tmp_path)).killed == []
    assert zygote.poll() is None
    assert not record.exists(), "the record of a zygote that is gone is dropped"


def test_a_home_outside_the_warm_root_is_never_removed(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    root = tmp_path / "warm"
    root.mkdir(mode=0o700)
    owner, owner_start = dead_pid()
    write(root, owner_pid=owner, owner_start=owner_start, zygote_pid=owner,
          zygote_start=owner_start, home=str(outside))
    owners.sweep(str(root))
    assert outside.exists()
    assert list((root / owners.OWNERS_DIR).glob("*.json")) == [], "the record was swept"


def _group_alive(group: int) -> bool:
    """A process of the group that is not a zombie (its adopter may be slow to reap)."""
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error):
            if os.getpgid(proc.pid) == group and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


def test_a_record_made_in_another_pid_space_is_left_alone(
        tmp_path: Path, zygote: subprocess.Popen[bytes]) -> None:
    """Another host on a shared volume (another boot id, another host), another container
    of this boot (another pid namespace, this host): its pids are not ours to judge."""
    boot = owners.pid_space().split("/")[0]
    before_boot = time.time() - owners.now_s() - 3600
    for n, (space, host) in enumerate([("another-boot/4026531836", "another-machine/node"),
                                       (f"{boot}/4026530000", owners.host_id()),
                                       ("another-boot/4026531836", None)]):
        home = tmp_path / f"plugin-there-{n}"
        home.mkdir()
        owner, owner_start = dead_pid()
        record = write(tmp_path, owner_pid=owner, owner_start=owner_start,
                       zygote_pid=zygote.pid, zygote_start=owners.start_time(zygote.pid),
                       home=str(home), pid_space=space, host=host)
        os.utime(record, (before_boot, before_boot))
        swept = owners.sweep(str(tmp_path))
        assert swept.killed == [] and swept.previous_boot == 0
        assert zygote.poll() is None and home.exists() and record.exists()


def test_a_record_this_host_made_before_it_rebooted_is_removed_with_its_home(
        tmp_path: Path, zygote: subprocess.Popen[bytes]) -> None:
    """Every process such a record names is gone: its home and the record go, and nothing is
    signalled (its pids mean other processes now; here, a live one). One of another boot
    written after this boot began is not trusted to be that."""
    if not owners.host_id():
        pytest.skip("no /etc/machine-id: records are never taken for this host's")
    home, late_home = tmp_path / "plugin-before-reboot", tmp_path / "plugin-late"
    home.mkdir()
    (home / "setup").mkdir()
    (home / "setup" / "state").write_text("x")
    late_home.mkdir()
    owner, owner_start = dead_pid()
    fields = {"owner_pid": owner, "owner_start": owner_start, "zygote_pid": zygote.pid,
              "zygote_start": owners.start_time(zygote.pid),
              "pid_space": "a-boot-before/4026531836", "host": owners.host_id()}
    record = write(tmp_path, **fields, home=str(home))
    before_boot = time.time() - owners.now_s() - 60
    os.utime(record, (before_boot, before_boot))
    late = write(tmp_path, **{**fields, "zygote_start": fields["zygote_start"] + 1},  # type: ignore[operator]
                 home=str(late_home))
    swept = owners.sweep(str(tmp_path))
    assert swept.previous_boot == 1 and swept.killed == []
    assert not home.exists() and not record.exists()
    assert late_home.exists() and late.exists()
    assert zygote.poll() is None


def test_records_in_a_directory_another_user_could_write_are_not_trusted(
        tmp_path: Path, zygote: subprocess.Popen[bytes]) -> None:
    owner, owner_start = dead_pid()
    write(tmp_path, owner_pid=owner, owner_start=owner_start, zygote_pid=zygote.pid,
          zygote_start=owners.start_time(zygote.pid), home=str(tmp_path / "x"))
    (tmp_path / owners.OWNERS_DIR).chmod(0o777)
    assert owners.sweep(str(tmp_path)).killed == []
    assert zygote.poll() is None


def test_junk_in_the_records_is_dropped_once_old(tmp_path: Path) -> None:
    directory = tmp_path / owners.OWNERS_DIR
    directory.mkdir(mode=0o700)
    for name, text in ((".new-cut", ""), ("bad.json", "{"), ("huge.json", json.dumps(
            {"owner_pid": 10**30, "owner_start": 1, "zygote_pid": 10**30, "zygote_start": 1,
             "home": str(tmp_path / "h"), "pid_space": owners.pid_space()}))):
        (directory / name).write_text(text)
    old = time.time() - owners.JUNK_AFTER_S - 10
    for path in directory.iterdir():
        os.utime(path, (old, old))
    assert owners.sweep(str(tmp_path)).killed == []
    assert list(directory.iterdir()) == []



SWEEP_ON_A_FULL_DISK = """
import resource, signal, sys
from pluginpool.pool.sandbox import owners
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # every write fails: a full disk
print(owners.sweep(sys.argv[1]).killed)
"""


def test_an_orphan_whose_mark_cannot_be_written_is_killed_at_once(
        tmp_path: Path, zygote: subprocess.Popen[bytes]) -> None:
    """A full disk (an orphan filling it, with nobody left to watch its storage) must not
    keep it alive: without the mark there is no grace."""
    owner, owner_start = dead_pid()
    write(tmp_path, owner_pid=owner, owner_start=owner_start, zygote_pid=zygote.pid,
          zygote_start=owners.start_time(zygote.pid), home=str(tmp_path / "full"))
    done = subprocess.run([sys.executable, "-c", SWEEP_ON_A_FULL_DISK, str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == f"[{zygote.pid}]", done.stderr[-2000:]
    assert zygote.wait(timeout=10) == -9
    assert [p.name for p in (tmp_path / owners.OWNERS_DIR).iterdir()] == []


LEFT_BEHIND = """
import os, sys, time
os.setsid()
if os.fork() == 0:  # what a teardown started, working in the home (or elsewhere)
    os.chdir(sys.argv[1])
    print(os.getpid(), flush=True)
    time.sleep(120)
    os._exit(0)
time.sleep(0.5)
os._exit(0)  # the zygote is gone; its group lives on without it
"""


@pytest.mark.parametrize("inside", [True, False])
def test_what_a_gone_zygote_left_in_its_home_is_killed_and_nothing_else(
        tmp_path: Path, inside: bool) -> None:
    """The group of a gone zygote is matched by where its members work, not by its id
    alone: a pid freed since may lead another group (a worker started with --detach runs
    in a group whose leader is gone)."""
    home = tmp_path / "plugin-left"
    home.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    leader = subprocess.Popen([sys.executable, "-c", LEFT_BEHIND,
                               str(home if inside else elsewhere)], stdout=subprocess.PIPE)
    assert leader.stdout is not None
    assert select.select([leader.stdout], [], [], 30)[0]
    member = int(leader.stdout.readline())
    zygote_start = owners.start_time(leader.pid)
    leader.wait(timeout=10)
    leader.stdout.close()
    owner, owner_start = dead_pid()
    write(tmp_path, owner_pid=owner, owner_start=owner_start, zygote_pid=leader.pid,
          zygote_start=zygote_start, home=str(home))
    try:
        assert owners.sweep(str(tmp_path)).killed == []  # the zygote itself was gone
        if inside:
            assert wait_until(lambda: not _alive(member), timeout_s=10)
        else:
            assert _alive(member), "a process working elsewhere is not the zygote's"
        assert not home.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
