"""The pool child's side of the sandbox boundary holds against a hostile peer: every field
of a frame is typed, a partial frame never blocks it, it signals only processes it has
checked, and a zygote left alone still bounds its teardown. Fast: no worker, the real
runtime where a process is needed (the worker-level cases are in test_warm_sandboxes.py)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from pluginpool.pool.sandbox import frames, warm
from pluginpool.pool.sandbox.launcher import ZygoteLauncher, holds_socket
from pluginpool.pool.sandbox.outcome import RESERVED_DETAILS
from pluginpool.pool.sandbox.process_handle import ProcessHandle, UnverifiedProcess
from pluginpool.pool.sandbox.runner import standalone_plan
from pluginpool.pool.sandbox.runtime import channel, messages
from pluginpool.pool.sandbox.supervisor import Bounds, Exit, Supervisor
from pluginpool.pool.tools.processes import wait_until
from pluginpool.tasks.spec import PluginSpec
from tests.conftest import TEST_PLUGINS


@pytest.mark.parametrize("frame", [
    {"op": "result", "ok": False, "error": {"type": "bogus", "message": "m"}},
    {"op": "result", "ok": False, "error": {"type": "runtime", "message": "m", "x": 1}},
    {"op": "result", "ok": False, "error": {"type": "runtime", "message": "m",
                                            "details": "not a dict"}},
    {"op": "result", "ok": True, "cpu_s": "fast"},
    {"op": "result", "ok": "yes"},
    {"op": "log", "stream": "stdout", "text": 7},
    {"op": "started", "layers": [], "cpu_s": 0.1},
    {"op": "exited", "pid": 5, "status": 1 << 40, "cpu_s": 0.1, "maxrss_kb": 1},
    {"op": "exited", "pid": 5, "status": True, "cpu_s": 0.1, "maxrss_kb": 1},
    {"op": "forked", "pid": 0, "zygote_rss_bytes": 1},
    {"op": "result", "ok": True, "cpu_s": float("nan")},
    {"op": "started", "layers": {}, "cpu_s": 10 ** 400},
    {"op": "result", "ok": True, "wall_s": float("-inf")},
    {"op": "exited", "pid": 5, "status": 0, "cpu_s": -1.0, "maxrss_kb": 1},
    {"op": "forked", "pid": -1, "zygote_rss_bytes": 1},
    {"op": "ready", "pid": 9, "setup_ms": "x", "setup_cpu_ms": 1.0, "rss_bytes": 1,
     "layers": {}},
    {"op": "config", "plugin_id": "p", "entrypoint": "e", "operations": [1],
     "instance_id": None, "initial_data": {}, "code_paths": [], "read_paths": [], "home": "h",
     "setup_workspace": "s", "landlock_abi": 0, "zygote_seccomp_b64": None,
     "run_seccomp_b64": None, "max_memory_mb": 1, "max_storage_kb": 1, "setup_cpu_s": 1,
     "network_hosts": [], "max_network_requests": 0, "allow_processes": False,
     "max_result_bytes": 1, "limits": {}, "permissions": {}},
])
def test_a_field_of_the_wrong_type_is_a_protocol_error(frame: dict[str, object]) -> None:
    """Before, each of these decoded, and failed later as an untyped TypeError, ValueError
    or OverflowError wherever the pool child first used the field."""
    with pytest.raises(messages.ProtocolError):
        messages.decode(frame)


def test_a_frame_holding_nan_or_an_infinity_is_not_json() -> None:
    """Before, NaN passed (json's own parser takes it), became the run's CPU figure, and
    failed the instance's usage script halfway."""
    for text in (b'{"op": "result", "ok": true, "cpu_s": NaN}', b'{"x": [Infinity]}',
                 b'{"x": -Infinity}'):
        with pytest.raises(ValueError):
            channel.loads(text)


def test_well_typed_frames_still_decode() -> None:
    assert messages.decode({"op": "result", "ok": True, "value": {"any": ["thing"]},
                            "cpu_s": 1, "wall_s": 0.5}).ok is True
    assert messages.decode({"op": "closed", "error": None}).teardown is False
    assert messages.decode({"op": "storage", "action": "get"}).key is None


def test_reserved_detail_keys_are_named() -> None:
    assert {"message", "type_", "usage"} <= RESERVED_DETAILS


def frame_of(message: messages.Message) -> bytes:
    return channel.frame_of(message)


class Reaped:
    """A reaper whose process has always ended well (these tests watch no real run)."""

    def reap(self, *, block: bool) -> Exit:
        return Exit(status=0)


def test_the_frame_reader_returns_whole_frames_only_and_keeps_the_rest() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        reader = frames.FrameReader(ours.fileno(), max_bytes=1 << 16)
        log = frame_of(messages.Log(stream="stdout", text="hi"))
        started = frame_of(messages.Started(layers={}, cpu_s=0.1))
        theirs.sendall(log + started[:7])
        assert reader.read() == [messages.Log(stream="stdout", text="hi")]
        theirs.sendall(started[7:])
        assert reader.read() == [messages.Started(layers={}, cpu_s=0.1)]
        theirs.sendall(struct.pack(">I", 1 << 30))
        with pytest.raises(channel.FrameTooLarge):
            reader.read()


def test_the_frame_reader_sees_the_end() -> None:
    ours, theirs = socket.socketpair()
    with ours:
        reader = frames.FrameReader(ours.fileno(), max_bytes=1 << 16)
        theirs.sendall(struct.pack(">I", 100) + b"{")
        theirs.close()
        assert reader.read() == []
        assert not reader.closed
        assert reader.read() == []
        assert reader.closed


def test_a_half_sent_frame_is_cut_at_the_deadline() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(struct.pack(">I", 100) + b'{"op"')
        started = time.monotonic()
        with pytest.raises(frames.FrameDeadline):
            frames.receive_by(ours.fileno(), max_bytes=1 << 16,
                              deadline=time.monotonic() + 0.3)
        assert time.monotonic() - started < 2


def test_replies_nobody_reads_are_cut_at_the_deadline() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        reply = messages.StorageReply(ok=True, value="x" * 10_000)
        started = time.monotonic()
        with pytest.raises(frames.FrameDeadline):
            for _ in range(10_000):
                frames.send_by(ours.fileno(), reply, time.monotonic() + 0.3)
        assert time.monotonic() - started < 2
        assert os.get_blocking(ours.fileno())  # as it was


def test_only_a_checked_process_is_ever_signalled() -> None:
    for impossible in (0, 1, -1, os.getpid()):
        with pytest.raises(UnverifiedProcess):
            ProcessHandle.open(impossible)
    stranger = subprocess.Popen(["sleep", "60"])
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, time\n"
                               "p = subprocess.Popen(['sleep', '60'])\n"
                               "print(p.pid, flush=True)\n"
                               "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        with pytest.raises(UnverifiedProcess):
            ProcessHandle.open(stranger.pid, parent=parent.pid)
        handle = ProcessHandle.open(child, parent=parent.pid)
        assert handle.alive()
        handle.send(signal.SIGKILL)
        assert wait_until(lambda: psutil.Process(child).status() == psutil.STATUS_ZOMBIE
                          if psutil.pid_exists(child) else True, timeout_s=10)
        assert stranger.poll() is None
        handle.close()
        handle.send(signal.SIGKILL)  # closed: nothing happens
    finally:
        for proc in (stranger, parent):
            proc.kill()
            proc.wait()


def test_a_reaped_process_is_never_signalled_by_its_old_pid() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    handle = ProcessHandle.open(proc.pid)
    proc.kill()
    proc.wait()  # reaped: its pid may be anyone's now
    assert not handle.alive()
    handle.send(signal.SIGKILL)
    handle.send_group(signal.SIGKILL)
    handle.close()
    gone = ProcessHandle.open(proc.pid) if not psutil.pid_exists(proc.pid) else None
    if gone is not None:  # not reused yet: a handle on nothing
        assert not gone.alive()


def test_a_hello_must_come_from_the_process_holding_the_control_socket() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        inode = os.fstat(theirs.fileno()).st_ino
        assert holds_socket(os.getppid(), 3, inode) is False
        assert holds_socket(0, 3, inode) is False
        assert holds_socket(os.getpid(), theirs.fileno(), inode) is False  # never itself


def test_a_zygote_left_alone_bounds_a_teardown_that_hangs() -> None:
    """The pool child is gone (its end of the control socket closed): the zygote runs the
    teardown on its own, and a close() that hangs no longer keeps it alive for ever."""
    spec = PluginSpec.model_validate({
        "id": "hangs-at-close", "name": "hangs-at-close",
        "entrypoint": "pp_testplugins.lifecycle:HangsAtClose"})
    root = tempfile.mkdtemp(prefix="pp-test-protocol-")
    plan = standalone_plan(spec, code_paths=(str(TEST_PLUGINS),), warm_root=root)
    sandbox, out = warm.start(ZygoteLauncher(code_paths=(str(TEST_PLUGINS),)), plan,
                              storage=lambda request: {"ok": False})
    assert sandbox is not None, out
    pid = sandbox.pid
    try:
        sandbox.control.close()
        assert sandbox.output is not None
        sandbox.output.close()

        def gone() -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True
        assert not gone()
        assert wait_until(gone, timeout_s=15)
    finally:
        sandbox.kill()


def test_a_final_frame_already_there_at_the_deadline_is_the_outcome(tmp_path: Path) -> None:
    """Before, the wall clock was checked before the channel was read: a run whose Result
    had arrived while a slow sample ran past its deadline was reported as a timeout."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(channel.frame_of(messages.Result(ok=True, value=1)))
        ticks = iter([0.0] + [100.0] * 50)  # the first look is already past the deadline

        out = Supervisor(proc.pid, ours.fileno(), bounds=Bounds(
            timeout_s=1.0, max_memory_bytes=1 << 30, max_storage_bytes=1 << 30,
            cpu_percent=100), workspace=str(tmp_path), baseline_rss=0, storage=None,
            max_frame_bytes=1 << 20, reaper=Reaped(), clock=lambda: next(ticks)).run()
        assert out.killed_for is None
        assert out.result == messages.Result(ok=True, value=1)
    finally:
        ours.close()
        theirs.close()
        proc.kill()
        proc.wait()


def test_the_frame_reader_reassembles_frames_split_anywhere() -> None:
    sent = [messages.Log(stream="stdout", text="x" * size) for size in (0, 5, 70_000, 3)]
    sent.append(messages.Result(ok=True, value={"big": "y" * 200_000}))
    stream = b"".join(channel.frame_of(message) for message in sent)
    for piece in (1, 3, 4, 7, 4096, 65_537):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            reader = frames.FrameReader(ours.fileno(), max_bytes=1 << 20)
            got: list[messages.Message] = []
            for start in range(0, len(stream), piece * 97 if piece < 100 else piece):
                theirs.sendall(stream[start:start + (piece * 97 if piece < 100 else piece)])
                while True:
                    ready = select.select([ours], [], [], 0)[0]
                    if not ready:
                        break
                    got.extend(reader.read())
            assert got == sent, piece


def test_a_spawn_the_zygote_does_not_read_is_cut_at_the_deadline() -> None:
    """Before, a zygote that stopped reading its control socket held the pool child in
    sendall (a Spawn carries the payload, more than the socket holds) until Celery's soft
    limit."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        spawn = messages.Spawn(job_id="j", operation="run", payload="x" * 2_000_000,
                               attempt=1, workspace="/w", cpu_backstop_s=1, max_memory_mb=1,
                               max_storage_kb=1)
        passed = os.dup(0)
        try:
            started = time.monotonic()
            with pytest.raises(frames.FrameDeadline):
                frames.send_with_fd_by(ours, spawn, passed, time.monotonic() + 0.3)
            assert time.monotonic() - started < 2
        finally:
            os.close(passed)


def test_a_spawn_arrives_whole_with_its_descriptor() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        spawn = messages.Spawn(job_id="j", operation="run", payload="x" * 300_000,
                               attempt=1, workspace="/w", cpu_backstop_s=1, max_memory_mb=1,
                               max_storage_kb=1)
        got: list[bytes] = []
        fds: list[int] = []

        def receive() -> None:
            data, passed, _flags, _addr = socket.recv_fds(theirs, 1 << 16, 1)
            got.append(data)
            fds.extend(passed)
            while sum(map(len, got)) < len(channel.frame_of(spawn)):
                got.append(theirs.recv(1 << 16))

        import threading
        reader = threading.Thread(target=receive)
        reader.start()
        frames.send_with_fd_by(ours, spawn, 0, time.monotonic() + 10)
        reader.join(10)
        assert b"".join(got) == channel.frame_of(spawn) and len(fds) == 1
        os.close(fds[0])


def test_a_pid_already_gone_when_named_is_never_signalled_nor_its_group() -> None:
    """A double-forked daemon's group id is a pid that has exited: a zygote naming it got
    a handle that killpg'd the daemon's whole group (third review)."""
    shell = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!"], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    assert shell.stdout is not None
    daemon = int(shell.stdout.readline())
    shell.wait()  # the group's leader is gone (and reaped); its member lives on
    try:
        handle = ProcessHandle.open(shell.pid, parent=os.getpid())
        handle.send_group(signal.SIGKILL)
        handle.send(signal.SIGKILL)
        time.sleep(0.2)
        assert psutil.Process(daemon).status() != psutil.STATUS_ZOMBIE
    finally:
        os.kill(daemon, signal.SIGKILL)


@pytest.mark.parametrize("watched_exits", [True, False])
def test_a_stream_of_frames_cannot_hold_the_supervisor_past_its_clock(
        tmp_path: Path, watched_exits: bool) -> None:
    """Something that keeps writing whole frames (a child of the run holding the channel,
    or the run itself past its deadline) kept the final read going for ever."""
    import threading

    proc = subprocess.Popen(["sleep", "0.2" if watched_exits else "60"],
                            start_new_session=True)
    ours, theirs = socket.socketpair()
    stop = threading.Event()

    def stream() -> None:
        frame = channel.frame_of(messages.Log(stream="stdout", text="x" * 1000))
        with contextlib.suppress(OSError):
            while not stop.is_set():
                theirs.sendall(frame)

    writer = threading.Thread(target=stream, daemon=True)
    writer.start()

    try:
        started = time.monotonic()
        out = Supervisor(proc.pid, ours.fileno(), bounds=Bounds(
            timeout_s=1.0, max_memory_bytes=1 << 30, max_storage_bytes=1 << 30,
            cpu_percent=100), workspace=str(tmp_path), baseline_rss=0, storage=None,
            max_frame_bytes=1 << 20, reaper=Reaped()).run()
        assert time.monotonic() - started < 5
        assert out.result is None
    finally:
        stop.set()
        ours.close()
        writer.join(5)
        theirs.close()
        proc.kill()
        proc.wait()


def test_float_fields_refuse_negative_ints_and_overflowing_numbers() -> None:
    with pytest.raises(messages.ProtocolError):
        messages.decode({"op": "result", "ok": True, "cpu_s": -5})
    with pytest.raises(messages.ProtocolError):
        messages.decode({"op": "result", "ok": True, "network_requests": -1})
    with pytest.raises(ValueError):
        channel.loads(b'{"op": "result", "ok": true, "value": 1e999}')
    assert channel.loads(b'{"x": 1.5e300}') == {"x": 1.5e300}


def test_what_an_ended_process_left_on_its_channel_is_read_whole_however_slowly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fourth review: the final read was cut at 0.1 s; a pool child slow to read a large
    Result its run wrote just before it ended (a loaded host) lost it."""
    proc = subprocess.Popen(["true"])
    while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)  # ended, not reaped: its pidfd is readable at once
    ours, theirs = socket.socketpair()
    slow_read = frames.FrameReader.read

    def slowly(self: frames.FrameReader) -> list[messages.Message]:
        time.sleep(0.06)
        return slow_read(self)

    monkeypatch.setattr(frames.FrameReader, "read", slowly)
    try:
        result = messages.Result(ok=True, value="v" * 150_000)
        theirs.sendall(channel.frame_of(result))

        out = Supervisor(proc.pid, ours.fileno(), bounds=Bounds(
            timeout_s=10.0, max_memory_bytes=1 << 30, max_storage_bytes=1 << 30,
            cpu_percent=100), workspace=str(tmp_path), baseline_rss=0, storage=None,
            max_frame_bytes=1 << 20, reaper=Reaped()).run()
        assert out.result == result
    finally:
        ours.close()
        theirs.close()
        proc.wait()
