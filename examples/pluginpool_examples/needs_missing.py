"""A plugin whose module imports a package that is not installed."""

from __future__ import annotations

from typing import Any

import definitely_not_installed_pkg  # type: ignore[import-not-found]  # noqa: F401


def run(ctx: Any, payload: Any) -> None:
    return None
