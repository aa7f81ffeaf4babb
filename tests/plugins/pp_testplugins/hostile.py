"""Plugins that try to hurt the worker, the broker, the host or the plugins after them."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import subprocess
import threading
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded


def busy_loop(ctx: Any, payload: Any) -> Any:
    while True:
        pass


def swallow_soft_limit(ctx: Any, payload: Any) -> Any:
    while True:
        try:
            while True:
                pass
        except (SoftTimeLimitExceeded, Exception):
            continue


def memory_bomb(ctx: Any, payload: Any) -> Any:
    hoard = []
    while True:
        hoard.append(bytearray(8 * 1024 * 1024))
        hoard[-1][::4096] = b"x" * len(hoard[-1][::4096])


def cpu_hog(ctx: Any, payload: Any) -> Any:
    deadline = time.monotonic() + float(payload["seconds"])
    spins = 0
    while time.monotonic() < deadline:
        spins += 1
    return spins


def exit_now(ctx: Any, payload: Any) -> Any:
    os._exit(17)


def segfault(ctx: Any, payload: Any) -> Any:
    ctypes.string_at(0)


def read_secret(ctx: Any, payload: Any) -> Any:
    with open(payload.get("path", "/etc/passwd")) as handle:
        return handle.read()


def write_outside(ctx: Any, payload: Any) -> Any:
    with open(payload["path"], "w") as handle:
        handle.write("escaped")
    return "written"


def write_outside_swallowed(ctx: Any, payload: Any) -> Any:
    try:
        with open(payload["path"], "w") as handle:
            handle.write("escaped")
    except OSError:
        pass
    return "pretending all is well"


def connect(ctx: Any, payload: Any) -> Any:
    conn = socket.create_connection((payload["host"], int(payload["port"])), timeout=2)
    conn.sendall(b"SET hostile 1\r\n")
    conn.close()
    return "connected"


def many_connections(ctx: Any, payload: Any) -> Any:
    for _ in range(int(payload["count"])):
        socket.create_connection((payload["host"], int(payload["port"])), timeout=2).close()
    return "done"


def shell(ctx: Any, payload: Any) -> Any:
    return subprocess.run(["sh", "-c", "echo pwned"], capture_output=True, text=True).stdout


def os_system(ctx: Any, payload: Any) -> Any:
    return os.system("touch /tmp/pluginpool-os-system-was-here")


def fork_and_linger(ctx: Any, payload: Any) -> Any:
    pid = os.fork()
    if pid == 0:
        os.setsid()
        time.sleep(120)
        os._exit(0)
    return {"lingering_pid": pid}


def leave_thread(ctx: Any, payload: Any) -> Any:
    def spin() -> None:
        while True:
            (ctx.workspace / "thread.txt").write_text(str(time.time()))
            time.sleep(0.01)

    threading.Thread(target=spin, daemon=False).start()
    return "left a thread"


def fill_workspace(ctx: Any, payload: Any) -> Any:
    with open(ctx.workspace / "big.bin", "wb") as handle:
        for _ in range(int(payload["kb"])):
            handle.write(b"x" * 1024)
    return "filled"


def fill_workspace_many_files(ctx: Any, payload: Any) -> Any:
    for index in range(int(payload["files"])):
        (ctx.workspace / f"f{index}.bin").write_bytes(b"x" * 4096)
    time.sleep(1)
    return "filled"


def many_empty_files(ctx: Any, payload: Any) -> Any:
    """Empty files take no blocks: the storage quota never sees them."""
    for index in range(int(payload["files"])):
        (ctx.workspace / f"e{index}").touch()
    time.sleep(5)
    return "made"


def huge_result(ctx: Any, payload: Any) -> Any:
    return "x" * int(payload["bytes"])


def not_json(ctx: Any, payload: Any) -> Any:
    return {1, 2, 3}


def close_all_fds(ctx: Any, payload: Any) -> Any:
    os.closerange(0, 65536)
    for fd in range(0, 1024):
        with contextlib.suppress(OSError):
            os.close(fd)
    return "still answering"


def monkeypatch_stdlib(ctx: Any, payload: Any) -> Any:
    json.dumps = lambda *args, **kwargs: '"hacked"'
    json.loads = lambda *args, **kwargs: "hacked"
    os.getcwd = lambda: "/hacked"
    time.time = lambda: 0.0
    return "patched"


def kill_parent(ctx: Any, payload: Any) -> Any:
    os.kill(os.getppid(), 9)
    return "tried"


def read_environment(ctx: Any, payload: Any) -> Any:
    return dict(os.environ)


def storage(ctx: Any, payload: Any) -> Any:
    if payload.get("action") == "fill":
        for index in range(1000):
            ctx.storage.set(f"k{index}", "x" * 512)
    ctx.storage.set("count", (ctx.storage.get("count") or 0) + 1)
    return {"count": ctx.storage.get("count"), "keys": len(ctx.storage.keys())}


def native_read(ctx: Any, payload: Any) -> Any:
    """Bypass the audit hook: open(2) straight from libc."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.open(payload["path"].encode(), os.O_RDONLY)
    return {"fd": fd, "errno": ctypes.get_errno()}


def native_socket(ctx: Any, payload: Any) -> Any:
    """Bypass the audit hook: socket(2) straight from libc."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
    return {"fd": fd, "errno": ctypes.get_errno()}


def native_exec(ctx: Any, payload: Any) -> Any:
    """Bypass the audit hook: execv(2) straight from libc."""
    libc = ctypes.CDLL(None, use_errno=True)
    argv = (ctypes.c_char_p * 3)(b"/bin/sh", b"-c", None)
    result = libc.execv(b"/bin/sh", argv)
    return {"result": result, "errno": ctypes.get_errno()}


def daemonize_then_wait(ctx: Any, payload: Any) -> Any:
    """Leaves a daemon (double fork, a session of its own: outside the run's and the
    zygote's process groups, re-parented to the zygote), stores its pid, then waits to be
    killed with its zygote."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        daemon = os.fork()
        if daemon == 0:
            os.setsid()
            time.sleep(600)
            os._exit(0)
        os.write(write_end, str(daemon).encode())
        os._exit(0)
    os.waitpid(child, 0)
    os.close(write_end)
    ctx.storage.set("daemon", int(os.read(read_end, 64)))
    time.sleep(60)
    return "not killed"
