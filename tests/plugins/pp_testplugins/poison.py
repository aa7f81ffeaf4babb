"""A plugin that kills whatever consumes its job: the crash-loop case of the poison rule.

Run in the pool child (unsandboxed), `kill` SIGKILLs the worker's main process, the way a
message that crashes Celery's consumer would, and then its own pool process, so the job
never completes; anything else is echoed.
"""

from __future__ import annotations

import os
import signal
from typing import Any


def kill_or_echo(ctx: Any, payload: Any) -> Any:
    if payload == "kill":
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)  # and never returns: the job never completes
    return payload
