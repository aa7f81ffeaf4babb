"""The sandbox's resource limits are set inside the sandbox (runtime/limits.py); the
worker side only needs their constants."""

from __future__ import annotations

from pluginpool.pool.sandbox.runtime.limits import ADDRESS_SPACE_HEADROOM_MB, MAX_OPEN_FILES

__all__ = ["ADDRESS_SPACE_HEADROOM_MB", "MAX_OPEN_FILES"]
