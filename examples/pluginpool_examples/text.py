"""Well-behaved plugins."""

from __future__ import annotations

from typing import Any


def word_count(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Count words; the instance's `initial_data["lowercase"]` folds case first."""
    text = str(payload.get("text", ""))
    if ctx.initial_data.get("lowercase"):
        text = text.lower()
    counts: dict[str, int] = {}
    for word in text.split():
        counts[word] = counts.get(word, 0) + 1
    return {"words": sum(counts.values()), "distinct": len(counts), "counts": counts}


def noop(ctx: Any, payload: Any) -> Any:
    """Return the payload: the cheapest possible plugin, used by the benchmark."""
    return payload
