"""Every Redis key pluginpool uses, under one prefix (default `pluginpool:`).

One place so that operators can find, size and clean pluginpool's data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    """Key names for one deployment, derived from its prefix."""

    prefix: str = "pluginpool:"

    @property
    def specs(self) -> str:
        """Hash: plugin id → current spec JSON (with its registry revision)."""
        return f"{self.prefix}registry:specs"

    def spec_history(self, plugin_id: str) -> str:
        """List: past spec JSONs of one plugin, newest first, bounded."""
        return f"{self.prefix}registry:history:{plugin_id}"

    def instance(self, instance_id: str) -> str:
        """Hash: one loaded plugin instance (plugin id, initial data, created at)."""
        return f"{self.prefix}instance:{instance_id}"

    def instances_of(self, plugin_id: str) -> str:
        """Set: ids of the loaded instances of one plugin."""
        return f"{self.prefix}instances:{plugin_id}"

    @property
    def dead_letter(self) -> str:
        """List: broker messages that could not be parsed, with the reason; bounded."""
        return f"{self.prefix}deadletter"
