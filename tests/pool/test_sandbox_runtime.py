"""The sandbox runtime stays what a zygote can load anywhere: the standard library only,
and one typed definition of every message, encoded and decoded in one place."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pluginpool.pool.sandbox.guardians import RUNTIME_DIR, RUNTIME_MODULE
from pluginpool.pool.sandbox.launcher import ZygoteLauncher, ZygoteStartError
from pluginpool.pool.sandbox.output import OutputPipes
from pluginpool.pool.sandbox.runtime import messages

LOAD_ALL = (
    "import importlib.util as u, sys, json\n"
    "before = set(sys.modules)\n"  # what the interpreter's startup (site, .pth) loaded
    "d = sys.argv[1]\n"
    f"s = u.spec_from_file_location({RUNTIME_MODULE!r}, d + '/__init__.py',"
    " submodule_search_locations=[d])\n"
    "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m)\n"
    "import importlib, pkgutil\n"
    "names = [n for _, n, _ in pkgutil.iter_modules([d])]\n"
    f"for n in names: importlib.import_module({RUNTIME_MODULE!r} + '.' + n)\n"
    "new = sorted(set(sys.modules) - before)\n"
    "files = [getattr(sys.modules[n], '__file__', None) or '' for n in new]\n"
    "print(json.dumps({'names': names, 'files': files, 'modules': new}))\n"
)


def test_the_runtime_imports_nothing_but_the_standard_library() -> None:
    out = subprocess.run([sys.executable, "-I", "-c", LOAD_ALL, RUNTIME_DIR],
                         capture_output=True, text=True, check=True, timeout=60)
    loaded = json.loads(out.stdout)
    assert {"zygote", "run", "messages", "landlock", "audit"} <= set(loaded["names"])
    assert not any(name.split(".")[0] in ("pluginpool", "pydantic", "celery", "redis",
                                          "psutil", "pyseccomp")
                   for name in loaded["modules"])
    assert not [f for f in loaded["files"] if "site-packages" in f]
    assert "logging" not in loaded["modules"]  # its fork handlers cost every run


@pytest.mark.parametrize("message", [
    messages.Spawn(job_id="j", operation="run", payload={"deep": [1, {"x": None}]},
                   attempt=2, workspace="/w", cpu_backstop_s=3, max_memory_mb=64,
                   max_storage_kb=8),
    messages.Result(ok=False, error=messages.RunError("security", "no", {"path": "/etc"}),
                    network_requests=2, cpu_s=0.5, wall_s=1.0),
    messages.Closed(error=None, teardown=True),
    messages.StorageReply(ok=False, quota=True, limit_bytes=10, observed_bytes=11),
])
def test_every_message_survives_the_wire(message: messages.Message) -> None:
    frame = json.loads(json.dumps(messages.encode(message)))
    assert messages.decode(frame) == message


def test_an_unknown_or_malformed_frame_is_a_protocol_error() -> None:
    with pytest.raises(messages.ProtocolError):
        messages.decode({"op": "pickle"})
    with pytest.raises(messages.ProtocolError):
        messages.decode({"op": "forked", "pid": 1})


def test_frames_formatted_on_the_fast_path_decode_as_their_messages() -> None:
    """The zygote and the run format their per-run frames directly (fewer pages touched
    after a fork); each must be exactly the message encode() would have sent."""
    layers = {"process": "fork", "rlimits": {"cpu_s": 3}, "landlock": False}
    cases: list[tuple[bytes, messages.Message]] = [
        (messages.forked_frame(12, 3456), messages.Forked(pid=12, zygote_rss_bytes=3456)),
        (messages.exited_frame(12, 9, 0.25, 1024),
         messages.Exited(pid=12, status=9, cpu_s=0.25, maxrss_kb=1024)),
        (messages.started_frame(messages.started_prefix(layers), 0.001),
         messages.Started(layers=layers, cpu_s=0.001)),
        (messages.result_frame(json.dumps({"a": [1, "é"]}).encode(), network_requests=2,
                               cpu_s=1e-05, wall_s=0.5),
         messages.Result(ok=True, value={"a": [1, "é"]}, network_requests=2, cpu_s=1e-05,
                         wall_s=0.5)),
    ]
    for frame, message in cases:
        assert messages.decode(json.loads(frame)) == message


def test_a_zygote_that_cannot_start_says_why_with_what_its_interpreter_wrote(
        tmp_path: Path) -> None:
    """Its descriptor 2 is a pipe the pool child reads: the interpreter's own error (here a
    runtime directory that does not exist) comes with ZygoteStartError, not into the
    worker's log."""
    launcher = ZygoteLauncher(runtime_dir=str(tmp_path / "no-runtime-here"))
    with pytest.raises(ZygoteStartError) as failed:
        launcher.start()
    assert "it wrote" in str(failed.value) and "Traceback" in str(failed.value)
    assert "no-runtime-here" in str(failed.value)


def test_output_pipes_closed_twice_leave_reused_descriptor_numbers_alone() -> None:
    pipes, writers = OutputPipes.create()
    for fd in writers:
        os.close(fd)
    pipes.close()
    read_end, write_end = os.pipe()  # may reuse the numbers just closed
    try:
        pipes.close()
        os.fstat(read_end)
        os.fstat(write_end)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_an_interpreter_writing_more_than_a_pipe_holds_at_start_is_not_stalled(
        tmp_path: Path) -> None:
    """Its pipes are read while its Hello is awaited: 200 KB on stderr before it fails
    still ends at once, with the end of what it wrote."""
    runtime = tmp_path / "noisy-runtime"
    runtime.mkdir()
    (runtime / "__init__.py").write_text(
        "import sys\nsys.stderr.write('w' * 200_000 + '\\n')\n"
        "raise SystemExit('this runtime refuses to start')\n")
    started = time.monotonic()
    with pytest.raises(ZygoteStartError) as failed:
        ZygoteLauncher(runtime_dir=str(runtime)).start()
    assert time.monotonic() - started < 10  # the Hello timeout is 30 s
    assert "this runtime refuses to start" in str(failed.value)


def test_what_a_zygotes_interpreter_writes_before_its_hello_goes_to_the_worker_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before, a zygote that started was silent about it: a site hook's warning was lost."""
    runtime = tmp_path / "runtime"
    shutil.copytree(RUNTIME_DIR, runtime, ignore=shutil.ignore_patterns("__pycache__"))
    init = runtime / "__init__.py"
    init.write_text("import sys\nsys.stderr.write('site hook: deprecated option\\n')\n"
                    + init.read_text())
    with caplog.at_level(logging.WARNING, logger="pluginpool.sandbox.launcher"):
        hello, control, output = ZygoteLauncher(runtime_dir=str(runtime)).start()
    try:
        [record] = [r for r in caplog.records if r.name == "pluginpool.sandbox.launcher"]
        assert str(hello.pid) in record.getMessage()
        assert "stderr: site hook: deprecated option" in record.getMessage()
    finally:
        os.kill(hello.pid, signal.SIGKILL)
        control.close()
        output.close()

