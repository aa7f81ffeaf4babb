"""Redis replies as text: clients built with and without `decode_responses` answer `bytes`
or `str` for the same command, and both reach code shared by producers and workers."""

from __future__ import annotations

from typing import Any


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
