"""What a plugin's operation `method(ctx, payload)` (or `run(ctx, payload)`) and its setup
`__init__(self, ctx)` receive besides the payload.

This is the in-process runner's context; a sandbox builds the same attributes from plain
data inside the zygote (pool/sandbox/runtime/context.py)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pluginpool.policy.limits import Permissions, ResourceLimits


class Storage(Protocol):
    """`ctx.storage`: a small persistent key-value store of the instance, JSON values."""

    def get(self, key: str, default: Any = None) -> Any: ...
    def set(self, key: str, value: Any) -> int: ...
    def delete(self, key: str) -> bool: ...
    def keys(self) -> list[str]: ...


@dataclass
class PluginContext:
    """The run's identity, its instance data, its limits, its workspace and storage."""

    plugin_id: str
    job_id: str
    instance_id: str | None
    attempt: int
    limits: ResourceLimits
    permissions: Permissions
    initial_data: dict[str, Any] = field(default_factory=dict)
    operation: str = "run"
    """The operation this job calls (one of the spec's `operations`)."""
    worker: str | None = None
    """The worker node running the job (warm sandboxes are published under it)."""
    code_paths: tuple[str, ...] = ()
    """Directories, beyond the deployment's plugin paths, that hold this plugin's code."""
    storage_factory: Callable[[], Storage] | None = None
    workspace_root: str | None = None
    _workspace: Path | None = None
    _storage: Storage | None = None

    @property
    def storage(self) -> Storage:
        """The instance's persistent key-value store (the plugin's, without an instance)."""
        if self._storage is None:
            if self.storage_factory is None:
                raise RuntimeError("this run has no storage")
            self._storage = self.storage_factory()
        return self._storage

    @property
    def workspace(self) -> Path:
        """A private scratch directory for this run, removed when the run ends."""
        if self._workspace is None:
            self._workspace = Path(tempfile.mkdtemp(prefix=f"pp-{self.plugin_id}-",
                                                    dir=self.workspace_root))
        return self._workspace

    def remove_workspace(self) -> None:
        if self._workspace is not None:
            shutil.rmtree(self._workspace, ignore_errors=True)
            self._workspace = None

    @property
    def logger(self) -> logging.Logger:
        return logging.getLogger(f"pluginpool.plugin.{self.plugin_id}")
