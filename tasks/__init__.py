"""The Celery side of pluginpool: settings, app, specs, registry, routing, task, client."""

from typing import Any

from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.jobs import FallbackJob, Job
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec

__all__ = ["AsyncJob", "AsyncPluginClient", "FallbackJob", "Job", "PluginClient", "PluginSpec",
           "Settings"]


def __getattr__(name: str) -> Any:
    """`app`/`celery`: the app `celery -A pluginpool.tasks` uses, built on first use from
    the environment (tasks/celery_app.py says why not at import); the asyncio client, whose
    redis.asyncio import only its users pay for."""
    if name in ("app", "celery"):
        from pluginpool.tasks.celery_app import build_cli_app

        app = build_cli_app()
        globals().update(app=app, celery=app)
        return app
    if name in ("AsyncPluginClient", "AsyncJob"):
        from pluginpool.tasks import async_client

        return getattr(async_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
