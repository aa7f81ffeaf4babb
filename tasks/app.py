"""The Celery app, configured once from settings: JSON only, reliable delivery, events on."""

from __future__ import annotations

from celery import Celery

from pluginpool.tasks.routing import route_plugin_task
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.transport import DEAD_LETTER_OPTION, TRANSPORT_PATH


def create_app(settings: Settings, *, name: str = "pluginpool",
               guarded_transport: bool = True) -> Celery:
    """A Celery app for producers, workers and monitors alike.

    Monitors that never consume plugin queues (Flower) pass `guarded_transport=False`:
    Flower picks its broker client from the URL scheme of the connection, which a custom
    transport class would hide.
    """
    app = Celery(name, broker=settings.effective_broker_url,
                 backend=settings.effective_result_backend, set_as_current=False)
    transport_options = {"visibility_timeout": settings.visibility_timeout_s}
    broker_options = {**transport_options, DEAD_LETTER_OPTION: settings.keys.dead_letter}
    if guarded_transport and settings.effective_broker_url.startswith(("redis://", "rediss://")):
        # Guards the worker against items on a queue that are not kombu messages.
        app.conf.broker_transport = TRANSPORT_PATH
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # At-least-once: ack after the run; a dead pool child is retried (bounded by the
        # plugin's max_restarts, see execution.py) instead of being lost or looping.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=broker_options,
        result_backend_transport_options=transport_options,
        visibility_timeout=settings.visibility_timeout_s,
        result_expires=settings.result_expires_s,
        task_routes=(route_plugin_task,),
        task_send_sent_event=True,
        worker_send_task_events=True,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.redis_socket_timeout_s,
        redis_socket_timeout=settings.redis_socket_timeout_s,
        redis_socket_connect_timeout=settings.redis_socket_timeout_s,
        task_publish_retry_policy={
            "max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5,
        },
        worker_cancel_long_running_tasks_on_connection_loss=False,
        enable_utc=True,
    )
    return app
