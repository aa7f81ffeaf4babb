"""The floor a sandboxed run is compared with: fork an interpreter, do a little Python in
the child (one json.dumps), `_exit`, reap with wait4. Prints the child's CPU and minor faults
and the parent's CPU per fork. Run: `python -m bench.bare_fork [FORKS]` beside
`python -m bench.sandbox_cost`, in the same minutes (the host's load moves both)."""

from __future__ import annotations

import json
import os
import resource
import select  # noqa: F401 - roughly what a zygote has imported
import signal  # noqa: F401
import socket  # noqa: F401
import struct  # noqa: F401
import sys
import time


def work() -> str:
    return json.dumps({"a": [1, 2, 3], "b": "x" * 10})


def measure(forks: int) -> dict[str, float]:
    work()
    child_cpu = child_faults = 0.0
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for _ in range(forks):
        pid = os.fork()
        if pid == 0:
            work()
            os._exit(0)
        _, _, usage = os.wait4(pid, 0)
        child_cpu += usage.ru_utime + usage.ru_stime
        child_faults += usage.ru_minflt
    after = resource.getrusage(resource.RUSAGE_SELF)
    parent = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"forks": forks, "child_cpu_ms": round(child_cpu / forks * 1000, 3),
            "child_faults": round(child_faults / forks, 1),
            "parent_cpu_ms": round(parent / forks * 1000, 3),
            "wall_ms": round((time.perf_counter() - started) / forks * 1000, 3)}


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)))
