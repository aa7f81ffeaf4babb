"""The log tail: the last max_bytes of a run's output, in order, the cut marked."""

from __future__ import annotations

from pluginpool.policy.errors import MAX_LOG_CHARS, ErrorInfo, ErrorType
from pluginpool.tasks.run_logs import LogTail, captured


def test_streams_are_kept_in_order_with_one_prefix_per_line() -> None:
    tail = LogTail(1024)
    tail.add("stdout", "one\ntw")
    tail.add("stderr", "oops\n")
    tail.add("stdout", "o\n")
    tail.add("log", "WARNING x: y")
    assert tail.text() == "stdout: one\nstderr: oops\nstdout: two\nlog: WARNING x: y\n"


def test_only_the_last_bytes_are_kept_and_the_cut_is_marked() -> None:
    tail = LogTail(100)
    for i in range(1000):
        tail.add("stdout", f"line {i:04d}\n")
    text = tail.text()
    assert text.startswith("[... ") and text.rstrip().endswith("line 0999")
    assert tail.dropped_bytes + 100 >= tail.total_bytes == 1000 * 10
    huge = LogTail(64)
    huge.add("stderr", "é" * 1000)  # one chunk larger than the cap: its end is kept
    assert huge.text().endswith("é\n") and len(huge.text().encode()) < 200


def test_an_in_process_capture_restores_the_streams() -> None:
    import logging
    import sys

    before = sys.stdout
    with captured("unit", max_bytes=1024) as tail:
        print("hello")
        logging.getLogger("pluginpool.plugin.unit").warning("careful")
    assert sys.stdout is before
    assert tail.text() == "stdout: hello\nlog: WARNING pluginpool.plugin.unit: careful\n"


def test_error_details_keep_the_end_of_long_logs() -> None:
    logs = "x" * MAX_LOG_CHARS + "the end"
    info = ErrorInfo(type=ErrorType.RUNTIME, message="m", details={"logs": logs})
    assert info.details["logs"].endswith("the end")
    assert info.details["logs"].startswith("...[truncated 7 chars]...")
