"""The sandbox runtime's records (runtime/records.py) behave as the dataclasses they
replaced: the type checker sees `dataclasses.dataclass`, so any difference at run time is
one nobody is warned about."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from pluginpool.pool.sandbox.runtime import messages
from pluginpool.pool.sandbox.runtime.records import field, record


def test_a_record_holding_a_nan_equals_itself_as_a_dataclass_does() -> None:
    """dataclasses compare the fields as tuples (the same object on both sides is equal,
    even a NaN); comparing field by field made a message unequal to itself."""

    @dataclasses.dataclass
    class Twin:
        pid: int
        cpu_s: float

    twin = Twin(1, math.nan)
    exited = messages.Exited(pid=1, status=0, cpu_s=math.nan, maxrss_kb=0)
    assert twin == twin
    assert exited == exited
    assert [exited] == [exited]  # list comparison: identity first, then __eq__
    other = messages.Exited(pid=1, status=0, cpu_s=exited.cpu_s, maxrss_kb=0)
    assert exited == other  # the same float object in both, as Twin(1, n) == Twin(1, n)
    assert exited != messages.Exited(pid=2, status=0, cpu_s=exited.cpu_s, maxrss_kb=0)


def test_a_subclass_keeps_the_default_factory_of_its_base_as_a_dataclass_does() -> None:
    """The module says inheritance is supported: a base's `field(default_factory=...)` is
    the subclass's default too (it was made a required argument)."""

    @record
    class Base:
        name: str
        items: list[Any] = field(default_factory=list)

    @record
    class Child(Base):
        extra: int = 0

    @dataclasses.dataclass
    class DBase:
        name: str
        items: list[Any] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass
    class DChild(DBase):
        extra: int = 0

    child, twin = Child("a"), DChild("a")
    assert (child.name, child.items, child.extra) == (twin.name, twin.items, twin.extra)
    assert Child("a").items is not Child("a").items  # one list per instance
    assert repr(child).split(".Child", 1)[1] == repr(twin).split(".DChild", 1)[1]
    assert Child("a", [1], 2) == Child("a", [1], 2)
