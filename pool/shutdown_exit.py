"""Telling billiard's own SystemExit (the pool process is being ended) from a plugin's.

billiard's terminate handler raises SystemExit(-(256 - signal)) in a pool process for every
terminating signal it handles (SIGTERM, SIGQUIT with REMAP_SIGTERM, SIGHUP, ...). Plugin
code run in the pool process (unsandboxed) may raise SystemExit too; that one is the
plugin's failure, the other must end the process (and its job is then run again)."""

from __future__ import annotations

import billiard.common


def is_pool_shutdown(exc: BaseException) -> bool:
    if not isinstance(exc, SystemExit):
        return False
    fired = getattr(billiard.common, "terminate_handler_fired", None)
    if fired is not None:  # billiard that records it
        return bool(fired())
    return isinstance(exc.code, int) and -255 <= exc.code < 0
