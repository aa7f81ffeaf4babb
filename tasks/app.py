"""The Celery app, configured once from settings: JSON only, reliable delivery, events on."""

from __future__ import annotations

import ssl
from typing import Any

from celery import Celery

from pluginpool.tasks.delivery_record import DELIVERY_OPTION, DeliveryConfig
from pluginpool.tasks.reliable_fetch import IDLE_WAIT_OPTION
from pluginpool.tasks.result_store import backend_url
from pluginpool.tasks.routing import route_plugin_task
from pluginpool.tasks.sent_event import AMQP_PATH as SENT_EVENT_AMQP_PATH
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.transport import SENTINEL_TRANSPORT_PATH, TRANSPORT_PATH

ENVELOPE_DEPTH = 8
"""Nesting levels a task message adds around a payload (envelope, body, kwargs)."""
ENVELOPE_BYTES = 65_536
"""Room for a message's headers and properties beside its payload."""


def delivery_config(settings: Settings) -> DeliveryConfig:
    """What the worker's decode boundary and poison rule accept, from the settings: a
    payload within the producer's limits always fits (base64 adds a third)."""
    return DeliveryConfig.for_keys(
        settings.keys,
        max_deliveries=settings.max_deliveries, dead_letter_max=settings.dead_letter_max,
        max_message_bytes=2 * settings.max_payload_bytes + ENVELOPE_BYTES,
        max_depth=settings.max_payload_depth + ENVELOPE_DEPTH,
        dead_after_s=settings.consumer_dead_after_s,
        keyspace_events=settings.broker_keyspace_events, rescan_s=settings.broker_rescan_s)


def tls_options(settings: Settings) -> dict[str, Any]:
    """Certificate checks for rediss:// brokers and backends (Celery requires them)."""
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.redis_tls_ca_file:
        options["ssl_ca_certs"] = settings.redis_tls_ca_file
    return options


def create_app(settings: Settings, *, name: str = "pluginpool",
               guarded_transport: bool = True) -> Celery:
    """A Celery app for producers, workers and monitors alike.

    Monitors that never consume plugin queues (Flower) pass `guarded_transport=False`:
    Flower picks its broker client from the URL scheme of the connection, which a custom
    transport class would hide.
    """
    app = Celery(name, broker=settings.effective_broker_url,
                 backend=backend_url(settings.effective_result_backend), set_as_current=False,
                 amqp=SENT_EVENT_AMQP_PATH)  # a job's task-sent rides on its publish
    transport_options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.redis_sentinel_master:
        transport_options["master_name"] = settings.redis_sentinel_master
    # kombu sweeps for messages whose worker died unacknowledged every 10 s x 10 by
    # default; sweep every restore_sweep_s so they return soon after the visibility timeout.
    broker_options = {**transport_options,
                      DELIVERY_OPTION: delivery_config(settings).as_option(),
                      IDLE_WAIT_OPTION: settings.broker_idle_wait_s,
                      "unacked_restore_interval": settings.restore_sweep_s,
                      "unacked_restore_throttle": 1}
    broker = settings.effective_broker_url
    if guarded_transport and broker.startswith(("redis://", "rediss://", "sentinel://")):
        # Guards the worker against items on a queue that are not kombu messages.
        app.conf.broker_transport = (SENTINEL_TRANSPORT_PATH if broker.startswith("sentinel://")
                                     else TRANSPORT_PATH)
    tls = tls_options(settings)
    if tls and broker.startswith("rediss://"):
        app.conf.broker_use_ssl = tls
    if tls and settings.effective_result_backend.startswith("rediss://"):
        app.conf.redis_backend_use_ssl = tls
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
        # A result that cannot be stored because Redis is restarting is stored once it is
        # back (instead of the job being recorded as failed with a ConnectionError).
        result_backend_always_retry=True,
        result_backend_max_retries=40,
        result_backend_base_sleep_between_retries_ms=50,
        result_backend_max_sleep_between_retries_ms=2000,
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
