"""The Celery side of pluginpool: settings, app, specs, registry, routing, task, client."""

from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.jobs import FallbackJob, Job
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec

__all__ = ["FallbackJob", "Job", "PluginClient", "PluginSpec", "Settings"]
