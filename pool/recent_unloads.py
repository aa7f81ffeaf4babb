"""The instances unloaded lately, as one pool process heard them.

An unload can come while an instance is being set up (a warm sandbox's zygote, or a class
in the pool child): there is nothing to retire yet, so the unload is remembered and the
instance is torn down after its first run. Instance ids are never reused, so remembering
one too long is never wrong; what is bounded is how many are kept, not for how long (a
setup may last as long as a job may: hours).
"""

from __future__ import annotations

from collections import OrderedDict

UNLOADS_KEPT = 10_000


class RecentUnloads:
    """Unloaded instance ids, the oldest forgotten past `kept`. Not thread-safe: its owner
    holds its own lock around it."""

    def __init__(self, kept: int = UNLOADS_KEPT) -> None:
        self.kept = kept
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, instance_id: str) -> None:
        self._ids[instance_id] = None
        self._ids.move_to_end(instance_id)
        while len(self._ids) > self.kept:
            self._ids.popitem(last=False)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._ids
