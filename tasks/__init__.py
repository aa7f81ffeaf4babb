"""The Celery side of pluginpool: settings, app, specs, registry, routing, task, client."""

from pluginpool.tasks.client import Job, PluginClient
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec

__all__ = ["Job", "PluginClient", "PluginSpec", "Settings"]
