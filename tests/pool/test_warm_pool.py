"""The warm pool's rules (pure logic, stand-in sandboxes): an unload retires an idle
sandbox at once, a busy one when it is given back, and one still being set up when the
unload came as soon as its first run gives it back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from pluginpool.pool.sandbox.warm import WarmSandbox
from pluginpool.pool.sandbox.warm_pool import WarmPool


@dataclass
class StandIn:
    key: tuple[str, int, str | None]
    busy: bool = False
    last_used: float = 0.0
    retired_for: list[str] = field(default_factory=list)

    @property
    def instance_id(self) -> str | None:
        return self.key[2]

    def alive(self) -> bool:
        return True

    def retire(self, reason: str) -> None:
        self.retired_for.append(reason)


def sandbox(instance_id: str) -> Any:
    return cast(WarmSandbox, StandIn(("p", 1, instance_id)))


def test_an_unload_during_a_setup_retires_the_sandbox_after_its_first_run() -> None:
    """Before, the unload found nothing to retire, and the sandbox lived until idle."""
    pool = WarmPool(capacity=4, idle_s=300)
    setting_up = sandbox("i1")
    pool.retire_instance("i1")  # arrives while the setup runs (the sandbox is not added yet)
    pool.add(setting_up)
    assert setting_up.retired_for == []  # its first run goes on
    pool.give_back(setting_up)
    assert setting_up.retired_for == ["instance unloaded"]
    assert pool.take(("p", 1, "i1")) is None
    assert pool.take_retiring() == [setting_up]


def test_idle_and_busy_sandboxes_of_an_unloaded_instance() -> None:
    pool = WarmPool(capacity=4, idle_s=300)
    idle, busy, other = sandbox("i1"), sandbox("i2"), sandbox("i3")
    for each in (idle, busy, other):
        pool.add(each)
        pool.give_back(each)
    assert pool.take(("p", 1, "i2")) is busy
    pool.retire_instance("i1")
    pool.retire_instance("i2")
    assert idle.retired_for == ["instance unloaded"] and busy.retired_for == []
    pool.give_back(busy)
    assert busy.retired_for == ["instance unloaded"] and other.retired_for == []


def test_unloads_are_remembered_by_count_not_by_time() -> None:
    """A setup may last hours: an unload heard during one is still known when it ends (it
    was forgotten after 600 s before); only the oldest beyond the bound go."""
    from pluginpool.pool.recent_unloads import RecentUnloads

    unloads = RecentUnloads(kept=2)
    for instance_id in ("a", "b", "c"):
        unloads.add(instance_id)
    assert "a" not in unloads and "b" in unloads and "c" in unloads and None not in unloads
