"""What a plugin sees inside the sandbox as `ctx`, for its setup and for each run.

The same attributes as pluginpool.tasks.context.PluginContext (the in-process runner's),
built from plain data: no pydantic, no Redis, no Celery here.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from . import channel
from .audit import AuditPolicy
from .messages import RESOURCE, StorageReply, StorageRequest

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from collections.abc import Callable
    from typing import Any

STORAGE_REPLY_MAX_BYTES = 64 << 20


class StorageQuotaExceededError(Exception):
    """A write would take the instance's storage over `max_storage_kb` (the name the pool
    child's own storage raises, so a plugin catches one name sandboxed or not)."""

    def __init__(self, *, limit_bytes: int, observed_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.observed_bytes = observed_bytes
        super().__init__(f"storage quota of {limit_bytes} bytes exceeded ({observed_bytes})")


StorageQuotaExceeded = StorageQuotaExceededError
"""Its earlier name."""


class InstanceUnloadedError(ValueError):
    """The instance was unloaded while this run was in flight: its storage is gone, and a
    write is refused (as in the pool child, same name)."""


class ChannelStorage:
    """`ctx.storage` in a sandbox: each call is served by the supervisor, which holds the
    Redis connection and the quota; the sandbox itself has no Redis connection at all."""

    def __init__(self, fd: int, policy: AuditPolicy,
                 on_closed: Callable[[], None] | None = None) -> None:
        self._fd = fd
        self._policy = policy
        self._on_closed = on_closed
        """Called when the channel is found gone (a setup's: ends its zygote, whatever the
        setup would do with the error)."""

    def _call(self, action: str, key: str | None = None, value: Any = None) -> Any:
        try:
            channel.send_message(self._fd, StorageRequest(action=action, key=key,
                                                          value=value))
            reply = channel.receive_message(self._fd, max_bytes=STORAGE_REPLY_MAX_BYTES)
        except (channel.ChannelClosed, OSError):
            if self._on_closed is not None:
                self._on_closed()
            raise
        if not isinstance(reply, StorageReply):
            raise ValueError("storage request got no storage reply")
        if reply.ok:
            return reply.value
        if reply.quota:
            self._policy.violations.append({
                "type": RESOURCE, "message": "storage quota exceeded",
                "details": {"limit": "max_storage_kb", "limit_value": reply.limit_bytes,
                            "observed": reply.observed_bytes, "store": "kv"}})
            raise StorageQuotaExceededError(limit_bytes=reply.limit_bytes,
                                            observed_bytes=reply.observed_bytes)
        if reply.unloaded:
            raise InstanceUnloadedError(reply.message)
        raise ValueError(reply.message or "storage request failed")

    def get(self, key: str, default: Any = None) -> Any:
        value = self._call("get", key=key)
        return default if value is None else value

    def set(self, key: str, value: Any) -> int:
        return int(self._call("set", key=key, value=value))

    def delete(self, key: str) -> bool:
        return bool(self._call("delete", key=key))

    def keys(self) -> list[str]:
        return list(self._call("keys"))


class SandboxContext:
    """`ctx`: identity, instance data, limits, workspace and storage of one setup or run."""

    def __init__(self, *, plugin_id: str, job_id: str | None, instance_id: str | None,
                 attempt: int, operation: str | None, limits: dict[str, Any],
                 permissions: dict[str, Any], initial_data: dict[str, Any], workspace: str,
                 storage: ChannelStorage) -> None:
        self.plugin_id = plugin_id
        self.job_id = job_id
        self.instance_id = instance_id
        self.attempt = attempt
        self.operation = operation
        self.limits = SimpleNamespace(**limits)
        self.permissions = SimpleNamespace(**permissions)
        self.initial_data = initial_data
        self.workspace = Path(workspace)
        self.storage = storage

    @property
    def logger(self) -> logging.Logger:
        # Imported on first use: logging's fork handlers cost every run ~0.7 ms of CPU.
        import logging

        from .logs import attach
        return attach(logging.getLogger(f"pluginpool.plugin.{self.plugin_id}"))
