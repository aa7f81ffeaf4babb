"""Bounds on the shape of producer-supplied JSON values, checked without recursion.

The JSON encoder, the JSON decoder and pickle (which billiard uses to hand a job to a
pool child) all recurse once per nesting level: a value nested a few thousand deep makes
them raise RecursionError, in the producer or, worse, in a worker's main process. So the
nesting depth is measured first, iteratively, and refused above a bound.
"""

from __future__ import annotations

from typing import Any

DEFAULT_MAX_PAYLOAD_DEPTH = 64
"""Default of `PLUGINPOOL_MAX_PAYLOAD_DEPTH`: far above what real payloads use, far below
the interpreter's recursion limit (1000) that encoders and pickle run into."""
MAX_PAYLOAD_DEPTH_CAP = 256
"""Most `PLUGINPOOL_MAX_PAYLOAD_DEPTH` may be: pickle, which hands a job to a pool child,
already fails near 500 levels inside a worker's call stack. The broker's decode boundary
allows this depth plus the message's envelope."""


def nesting_depth(value: Any, *, limit: int) -> int:
    """How deeply `value` nests lists, tuples and dicts (a scalar is 0, `[]` is 1).

    Stops as soon as the depth exceeds `limit` and returns `limit + 1`, so the cost is
    bounded for any value, a self-referencing one included (it counts as too deep).
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        depth += 1
        if depth > limit:
            return limit + 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children
                     if isinstance(child, dict | list | tuple))
    return deepest
