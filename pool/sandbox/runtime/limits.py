"""setrlimit inside the sandbox: irrevocable, so only in the zygote and in its runs.

Limits stack: the zygote's cover its setup and bound every run; each run lowers its own.
"""

from __future__ import annotations

import resource

MB = 1024 * 1024
ADDRESS_SPACE_HEADROOM_MB = 128
"""Virtual memory above the plugin's limit for thread stacks and the allocator's arenas;
the supervisor holds resident memory to the exact limit."""
MAX_OPEN_FILES = 64


def vms_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * resource.getpagesize()


def _set(which: int, value: int) -> None:
    """Lower soft and hard to `value`, never above the current hard limit."""
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def apply_zygote(*, max_memory_mb: int, max_storage_kb: int, setup_cpu_s: int) -> dict[str, int]:
    """The warm sandbox's own limits: its setup gets `max_memory_mb` of address space above
    the bare interpreter, and each later run gets that much again above the set-up zygote
    (hard limit), so a large setup does not starve the runs. CPU seconds bound the setup
    (soft); the runs set their own."""
    base = vms_bytes()
    per_use = (max_memory_mb + ADDRESS_SPACE_HEADROOM_MB) * MB
    resource.setrlimit(resource.RLIMIT_AS, (base + per_use, base + per_use + max_memory_mb * MB))
    resource.setrlimit(resource.RLIMIT_CPU, (setup_cpu_s, resource.RLIM_INFINITY))
    _set(resource.RLIMIT_FSIZE, max_storage_kb * 1024 + 1)
    _set(resource.RLIMIT_NOFILE, MAX_OPEN_FILES)
    _set(resource.RLIMIT_CORE, 0)
    return {"as_bytes": base + per_use, "cpu_s": setup_cpu_s,
            "fsize_bytes": max_storage_kb * 1024 + 1, "nofile": MAX_OPEN_FILES}


def after_setup() -> None:
    """The set-up zygote only forks from now on: lift the setup's CPU bound (soft only,
    up to the hard limit it kept), so a long-lived zygote never hits it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))


RunLimits = tuple[tuple[int, tuple[int, int]], ...]


def _lowered(which: int, value: int) -> tuple[int, int]:
    """(soft, hard) = `value`, never above the current hard limit."""
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    return value, value


def plan_run(*, vms_bytes: int, max_memory_mb: int, max_storage_kb: int,
             cpu_backstop_s: int) -> tuple[RunLimits, dict[str, int]]:
    """One run's limits, worked out in the zygote before the fork (its hard limits are the
    run's): what apply_run sets, and what the run reports (`vms_bytes`: the zygote's size
    at the fork)."""
    address_space = _lowered(
        resource.RLIMIT_AS, vms_bytes + (max_memory_mb + ADDRESS_SPACE_HEADROOM_MB) * MB)
    fsize = _lowered(resource.RLIMIT_FSIZE, max_storage_kb * 1024 + 1)
    plan: RunLimits = (
        (resource.RLIMIT_AS, address_space),
        (resource.RLIMIT_CPU, (cpu_backstop_s, cpu_backstop_s + 1)),
        (resource.RLIMIT_FSIZE, fsize),
        (resource.RLIMIT_NOFILE, _lowered(resource.RLIMIT_NOFILE, MAX_OPEN_FILES)))
    return plan, {"as_bytes": address_space[1], "cpu_s": cpu_backstop_s,
                  "fsize_bytes": max_storage_kb * 1024 + 1, "nofile": MAX_OPEN_FILES}


def apply_run(plan: RunLimits) -> None:
    """In the run's own process, before plugin code runs again: irrevocable, and lower
    than its zygote's."""
    for which, soft_hard in plan:
        _setrlimit(which, soft_hard)


_setrlimit = resource.setrlimit
