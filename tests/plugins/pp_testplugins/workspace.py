"""A run that looks at its workspace, then leaves every trace it can in it: files, a
directory it cannot list, the workspace made unreadable. The next run must see none."""

from __future__ import annotations

import os
from typing import Any


def leave_traces(ctx: Any, payload: Any) -> Any:
    workspace = str(ctx.workspace)
    stat = os.stat(workspace)
    seen = {"pid": os.getpid(), "cwd": os.getcwd(), "workspace": workspace,
            "entries": sorted(os.listdir(workspace)), "mode": stat.st_mode & 0o7777,
            "mtime_ns": stat.st_mtime_ns}
    with open(os.path.join(workspace, "left-behind.txt"), "w") as out:
        out.write("an earlier run was here")
    hidden = os.path.join(workspace, "hidden")
    os.mkdir(hidden)
    with open(os.path.join(hidden, "secret"), "w") as out:
        out.write("x" * 1000)
    os.chmod(hidden, 0)
    os.chmod(workspace, 0)
    return seen
