"""What a plugin may use and how it is isolated: the per-plugin models of the spec."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResourceLimits(_Strict):
    """Per-run ceilings. Each unit is in the field name."""

    max_memory_mb: int = Field(default=256, ge=16, le=1_048_576)
    max_cpu_percent: int = Field(default=100, ge=1, le=100)
    max_network_requests: int = Field(default=0, ge=0)
    max_storage_kb: int = Field(default=1024, ge=0)
    timeout_ms: int = Field(default=30_000, ge=10, le=86_400_000)

    @property
    def soft_time_limit_s(self) -> float:
        """Celery's soft limit: the plugin's own timeout."""
        return self.timeout_ms / 1000

    @property
    def hard_time_limit_s(self) -> float:
        """Celery's hard limit: a grace above the soft one (10%, at least 1 s, at most 30 s)."""
        grace_s = min(max(self.soft_time_limit_s * 0.1, 1.0), 30.0)
        return self.soft_time_limit_s + grace_s


class IsolationConfig(_Strict):
    """How a run is isolated and how a run whose process dies is restarted."""

    sandboxed: bool = True
    error_recovery: bool = True
    auto_restart: bool = True
    max_restarts: int = Field(default=3, ge=0, le=100)
    restart_cooldown_ms: int = Field(default=1000, ge=0, le=3_600_000)


class Permissions(_Strict):
    """What a plugin may reach beyond its own workspace."""

    network_hosts: list[str] = Field(default_factory=list)
    read_paths: list[str] = Field(default_factory=list)
    allow_processes: bool = False
