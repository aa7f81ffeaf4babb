"""setrlimit in the run's own process: irrevocable, so only ever in a throw-away process."""

from __future__ import annotations

import math
import resource

from pluginpool.policy.limits import ResourceLimits

MB = 1024 * 1024
ADDRESS_SPACE_HEADROOM_MB = 128
"""Virtual memory above the plugin's limit for thread stacks and the allocator's arenas;
the supervisor holds resident memory to the exact limit."""
MAX_OPEN_FILES = 64


def apply(limits: ResourceLimits, *, vms_at_fork: int) -> dict[str, int]:
    """Memory (address space), CPU seconds (a backstop behind the wall clock), file size
    (a single file cannot outgrow the storage quota) and open files."""
    address_space = vms_at_fork + (limits.max_memory_mb + ADDRESS_SPACE_HEADROOM_MB) * MB
    cpu_s = math.ceil(limits.timeout_ms / 1000) + 1
    file_size = limits.max_storage_kb * 1024 + 1
    applied = {"as_bytes": address_space, "cpu_s": cpu_s, "fsize_bytes": file_size,
               "nofile": MAX_OPEN_FILES}
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    resource.setrlimit(resource.RLIMIT_NOFILE, (MAX_OPEN_FILES, MAX_OPEN_FILES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return applied
