"""A process a run starts before its own seccomp filter is loaded does not outlive the run.

A plugin's import (its setup, in the zygote) can install an audit hook; in every run the
hook fires on the run's own lock-down calls (`resource.setrlimit`), before the run's filter
forbids forking, and can start a detached process, which the zygote (a subreaper) inherits.
The zygote kills whatever is left below it after every run, so it dies with the run.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from pluginpool.pool.sandbox import warm
from pluginpool.pool.sandbox.launcher import ZygoteLauncher
from pluginpool.pool.sandbox.runner import standalone_plan
from pluginpool.pool.sandbox.runtime.limits import MB
from pluginpool.pool.sandbox.runtime.messages import Result, Spawn
from pluginpool.pool.sandbox.supervisor import Bounds, Supervisor
from pluginpool.tasks.spec import PluginSpec

PLUGIN = '''\
import os
import sys
import time

_ZYGOTE = os.getpid()


def _hook(event, args):
    if event != "resource.setrlimit" or os.getpid() == _ZYGOTE:
        return
    if os.fork() == 0:  # before the run's filter: the zygote's own lets it fork
        os.setsid()
        if os.fork() == 0:
            with open(os.environ.get("MARK", "/dev/null"), "a"):
                pass
            time.sleep(60)
        os._exit(0)


sys.addaudithook(_hook)


def run(ctx, payload):
    return {"pid": os.getpid()}
'''


STDIO_PLUGIN = '''\
import os
import stat

os.dup2(3, 2)  # the setup puts a copy of its zygote's control socket on stderr


def run(ctx, payload):
    kinds = {}
    for fd in (0, 1, 2):
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            kinds[fd] = "closed"
            continue
        kinds[fd] = "socket" if stat.S_ISSOCK(mode) else "other"
    return kinds
'''


RLIMIT_PLUGIN = '''\
import ctypes
import os
import resource


class _Limit(ctypes.Structure):
    _fields_ = [("cur", ctypes.c_ulong), ("max", ctypes.c_ulong)]


os.dup2(3, 60)  # a copy of its zygote's control socket, above the limit set next
# Through ctypes, unseen by the audit hook: RLIMIT_NOFILE lowered below that copy.
ctypes.CDLL(None).setrlimit(resource.RLIMIT_NOFILE, ctypes.byref(_Limit(8, 8)))


def run(ctx, payload):
    try:
        os.fstat(60)
    except OSError:
        return "closed"
    return "open"
'''


def below(pid: int) -> list[int]:
    """Every process whose parent is `pid`."""
    kids: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as listing:
            kids += [int(k) for k in listing.read().split()]
    return kids


def warm_sandbox(tmp_path: Path, module: str, source: str) -> warm.WarmSandbox:
    code = tmp_path / "code"
    code.mkdir()
    (code / f"{module}.py").write_text(source, encoding="utf-8")
    spec = PluginSpec.model_validate({"id": module.replace("_", "-"), "name": module,
                                      "entrypoint": f"{module}:run"})
    plan = standalone_plan(spec, code_paths=(str(code),), warm_root=str(tmp_path / "warm"))
    sandbox, out = warm.start(ZygoteLauncher(code_paths=(str(code),)), plan,
                              storage=lambda _request: {"ok": False})
    assert sandbox is not None, out
    return sandbox


def run_once(sandbox: warm.WarmSandbox, attempt: int) -> Result:
    ours, theirs = socket.socketpair()
    forked = sandbox.spawn(Spawn(
        job_id=f"escape-{attempt}", operation="run", payload=None, attempt=attempt,
        workspace=sandbox.workspace, cpu_backstop_s=60, max_memory_mb=128,
        max_storage_kb=1024), theirs)
    theirs.close()
    done = Supervisor(
        forked.pid, ours.fileno(),
        bounds=Bounds(timeout_s=30, max_memory_bytes=128 * MB,
                      max_storage_bytes=1 << 20, cpu_percent=100),
        workspace=sandbox.workspace, baseline_rss=forked.zygote_rss_bytes,
        storage=None, max_frame_bytes=2 << 20, reaper=sandbox.run_reaper(forked.pid)).run()
    ours.close()
    assert isinstance(done.result, Result) and done.result.ok, done
    assert sandbox.clean_workspace()
    return done.result


def test_a_process_started_by_a_setup_hook_during_the_run_dies_with_it(
        tmp_path: Path) -> None:
    sandbox = warm_sandbox(tmp_path, "pp_escape_probe", PLUGIN)
    try:
        for attempt in (1, 2):
            run_once(sandbox, attempt)
            deadline = time.monotonic() + 10
            while below(sandbox.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert below(sandbox.pid) == [], "a process the run started outlived it"
    finally:
        sandbox.retire("test done")
        sandbox.finish()


def test_a_run_never_holds_the_control_socket_a_setup_put_on_its_stdio(
        tmp_path: Path) -> None:
    """A setup that dup2s its zygote's control socket onto stderr would hand every run a
    way to write frames the pool child takes for the zygote's: the run closes it."""
    sandbox = warm_sandbox(tmp_path, "pp_stdio_probe", STDIO_PLUGIN)
    try:
        result = run_once(sandbox, 1)
        assert result.value == {"0": "other", "1": "other", "2": "closed"}, result.value
    finally:
        sandbox.retire("test done")
        sandbox.finish()


if not os.path.exists("/proc/self/task"):  # pragma: no cover - Linux only, as the sandbox
    pytest.skip("needs /proc", allow_module_level=True)


def test_a_run_never_holds_a_control_socket_copy_hidden_above_a_lowered_fd_limit(
        tmp_path: Path) -> None:
    """A run closes every descriptor above its channel, whatever RLIMIT_NOFILE says: a
    setup that lowered it (through ctypes) above a copy of the control socket does not
    hand that copy to its runs."""
    sandbox = warm_sandbox(tmp_path, "pp_rlimit_probe", RLIMIT_PLUGIN)
    try:
        assert run_once(sandbox, 1).value == "closed"
    finally:
        sandbox.retire("test done")
        sandbox.finish()
