"""What a plugin may use and how it is isolated: the per-plugin models of the spec."""

from __future__ import annotations

import ipaddress
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_MEMORY_MB = 65_536
"""64 GiB: far more than one sandboxed run should get; the address-space rlimit (limit plus
headroom, in bytes) and the worker's max-memory-per-child stay exact far below it."""
MAX_STORAGE_KB = 4_194_304
"""4 GiB: the quota is enforced in bytes by setrlimit(RLIMIT_FSIZE) and by Redis Lua, whose
numbers are doubles (exact only up to 2**53 bytes); 9007199254740993 KB once registered
and then failed every run with OverflowError."""
MAX_TIMEOUT_MS = 86_400_000
"""24 h; registration also refuses a hard time limit that reaches the visibility timeout."""
MAX_NETWORK_REQUESTS = 1_000_000
MAX_RESTARTS = 100
MAX_RESTART_COOLDOWN_MS = 600_000
"""10 min: a restart waits as a Celery countdown, held by a worker while the broker's
visibility timeout runs; registration also refuses a cooldown that reaches it."""
MAX_PERMISSION_ENTRIES = 256
HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                      r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResourceLimits(_Strict):
    """Per-run ceilings. Each unit is in the field name."""

    max_memory_mb: int = Field(default=256, ge=16, le=MAX_MEMORY_MB)
    max_cpu_percent: int = Field(default=100, ge=1, le=100)
    max_network_requests: int = Field(default=0, ge=0, le=MAX_NETWORK_REQUESTS)
    max_storage_kb: int = Field(default=1024, ge=0, le=MAX_STORAGE_KB)
    timeout_ms: int = Field(default=30_000, ge=10, le=MAX_TIMEOUT_MS)
    setup_timeout_ms: int = Field(default=30_000, ge=10, le=MAX_TIMEOUT_MS)
    """Bounds a warm sandbox's setup (import and the class's __init__), like timeout_ms a run."""


class IsolationConfig(_Strict):
    """How a run is isolated and how a run whose process dies is restarted."""

    sandboxed: bool = True
    error_recovery: bool = True
    auto_restart: bool = True
    max_restarts: int = Field(default=3, ge=0, le=MAX_RESTARTS)
    restart_cooldown_ms: int = Field(default=1000, ge=0, le=MAX_RESTART_COOLDOWN_MS)


class Permissions(_Strict):
    """What a plugin may reach beyond its own workspace."""

    network_hosts: list[str] = Field(default_factory=list, max_length=MAX_PERMISSION_ENTRIES)
    read_paths: list[str] = Field(default_factory=list, max_length=MAX_PERMISSION_ENTRIES)
    allow_processes: bool = False

    @field_validator("network_hosts")
    @classmethod
    def _host_entries(cls, entries: list[str]) -> list[str]:
        """`host` or `host:port`, as the sandbox matches them: a URL, a path or a bad port
        would register and then never match, so it is refused here."""
        for entry in entries:
            problem = host_entry_problem(entry)
            if problem:
                raise ValueError(f"{entry!r}: {problem}")
        return entries

    @field_validator("read_paths")
    @classmethod
    def _absolute_paths(cls, paths: list[str]) -> list[str]:
        """Absolute and without `..`: the sandbox resolves nothing against a working
        directory, and a path that climbs out is not the path it names."""
        for path in paths:
            if not path.startswith("/") or "\0" in path:
                raise ValueError(f"{path!r}: must be an absolute path")
            if ".." in path.split("/"):
                raise ValueError(f"{path!r}: must not contain '..'")
        return paths


def host_entry_problem(entry: str) -> str | None:
    """What is wrong with one `network_hosts` entry, or None."""
    if "://" in entry or "/" in entry or "@" in entry:
        return "must be a host or host:port, not a URL"
    if entry != entry.strip() or not entry:
        return "must be a host or host:port without spaces"
    if entry.count(":") > 1:  # an IPv6 literal: any port (the sandbox cannot pair them)
        try:
            ipaddress.IPv6Address(entry)
        except ValueError:
            return "is neither host, host:port nor an IPv6 address (no brackets, no port)"
        return None
    host, sep, port = entry.partition(":")
    if sep and not (port.isdigit() and 1 <= int(port) <= 65_535):
        return f"port {port!r} is not a number from 1 to 65535"
    if not HOSTNAME.match(host):
        return f"{host!r} is not a host name or IPv4 address"
    return None
