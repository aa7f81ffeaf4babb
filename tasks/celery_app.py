"""The Celery app that `celery -A pluginpool.tasks inspect|control|events|purge|status`
finds, built from the `PLUGINPOOL_*` settings when (and only when) it is asked for.

Built lazily (`pluginpool.tasks.__getattr__`) rather than at import: importing
`pluginpool.tasks` must not read the environment or build a Celery app for the producers
and workers that make their own from explicit settings (a module-level app would be the
singleton tests must patch, and an invalid variable would break every import).
"""

from __future__ import annotations

import logging

import redis
from celery import Celery
from kombu import Queue

from pluginpool.tasks.app import create_app
from pluginpool.tasks.redis_conn import redis_client
from pluginpool.tasks.registry import Registry
from pluginpool.tasks.settings import Settings

logger = logging.getLogger("pluginpool.celery_app")


def build_cli_app(settings: Settings | None = None) -> Celery:
    """pluginpool's app, with every registered plugin's queue declared, so `celery purge`
    (all of them, or those named with -Q) and `inspect active_queues` know them."""
    settings = settings or Settings.from_env()
    app = create_app(settings)
    client = redis_client(settings)
    try:
        specs = Registry(client, settings.keys,
                         visibility_timeout_s=settings.visibility_timeout_s).all()
    except redis.RedisError as exc:  # inspect and status still work without the registry
        logger.warning("registry unreadable, no plugin queues declared: %s", exc)
        specs = []
    finally:
        client.close()
    if specs:
        app.conf.task_queues = [Queue(spec.queue, routing_key=spec.queue) for spec in specs]
    return app
