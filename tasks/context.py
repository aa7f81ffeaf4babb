"""What a plugin's `run(ctx, payload)` receives besides its payload."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pluginpool.policy.limits import Permissions, ResourceLimits


@dataclass(frozen=True)
class PluginContext:
    """The run's identity, its instance data and its limits. Read-only for the plugin."""

    plugin_id: str
    job_id: str
    instance_id: str | None
    attempt: int
    limits: ResourceLimits
    permissions: Permissions
    initial_data: dict[str, Any] = field(default_factory=dict)

    @property
    def logger(self) -> logging.Logger:
        return logging.getLogger(f"pluginpool.plugin.{self.plugin_id}")
