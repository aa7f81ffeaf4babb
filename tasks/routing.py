"""Where a plugin's jobs go: its own queue and task name, with its time limits."""

from __future__ import annotations

from typing import Any

PLUGIN_TASK_PREFIX = "plugin."
PLUGIN_QUEUE_PREFIX = "plugins."
REVISION_HEADER = "pluginpool_revision"
TRIAL_HEADER = "pluginpool_trial"


def task_name(plugin_id: str) -> str:
    return f"{PLUGIN_TASK_PREFIX}{plugin_id}"


def queue_name(plugin_id: str) -> str:
    return f"{PLUGIN_QUEUE_PREFIX}{plugin_id}"


def plugin_of_task(name: str) -> str | None:
    """The plugin id of a `plugin.<id>` task name, else None."""
    if name.startswith(PLUGIN_TASK_PREFIX):
        return name[len(PLUGIN_TASK_PREFIX):]
    return None


def route_plugin_task(name: str, args: Any, kwargs: Any, options: Any,
                      task: Any = None, **_: Any) -> dict[str, str] | None:
    """Celery router: `plugin.<id>` → queue `plugins.<id>`, whoever the producer is."""
    plugin_id = plugin_of_task(name)
    if plugin_id is None:
        return None
    return {"queue": queue_name(plugin_id)}
