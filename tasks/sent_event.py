"""A plugin job's `task-sent` event, published by its publish script: no round trip of its
own.

Celery publishes `task-sent` (for Flower and every event receiver) right after the task
message, as a PUBLISH of its own: one round trip of the five a submit makes, and kombu's
whole publish path in the producer. When the job's submit step already rides on the
publish (tasks/submit_step.py), the event is encoded here from the fields Celery made for
it (its own repr of the arguments, its clock, its anonymous hostname), with the queue,
exchange and routing key Celery would add, and `publish.lua` PUBLISHes it right after
the push, in the same step. A job the script refuses (a paused plugin) sends no event, as
before: Celery's publish raised before its event. Anything else (a message without a
step, a named exchange or routing key, a dispatcher of the caller's, an event that cannot
be encoded) is left to Celery. The event goes once, with the job's `queued` status: a
publish kombu retries after a lost reply pushes the job again but does not send it again.
One difference: the event's `pid` is the sending process's own, where Celery's cached
dispatcher keeps the pid of the process that first sent (a producer that forks).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from celery.app.amqp import AMQP
from kombu import Queue

from pluginpool.tasks.event_encoder import EventEncoder
from pluginpool.tasks.submit_step import SUBMIT_HEADER, SubmitStep

AMQP_PATH = "pluginpool.tasks.sent_event:SentEventInPublishAMQP"
"""For `Celery(amqp=...)`."""

logger = logging.getLogger(__name__)


class SentEventInPublishAMQP(AMQP):  # type: ignore[misc]
    """Celery's AMQP with the task sender wrapped as the module says."""

    def _create_task_sender(self) -> Any:
        celery_side: Any = super()  # celery-types declares neither of these two
        send = celery_side._create_task_sender()
        encoder = EventEncoder()
        hostname = celery_side._event_dispatcher.hostname  # Celery's anonymous node name
        app = self.app

        def send_task_message(producer: Any, name: str, message: Any, **options: Any) -> Any:
            headers, properties, body, sent_event = message
            extra_headers = options.get("headers") or {}  # merged into the message's by Celery
            step = extra_headers.get(SUBMIT_HEADER)
            queue = options.get("queue")
            if isinstance(queue, str):
                queue = self.queues[queue]
            if (sent_event is None or not isinstance(step, SubmitStep)
                    or options.get("event_dispatcher") is not None
                    or not isinstance(queue, Queue) or options.get("exchange")
                    or options.get("routing_key") or queue.exchange.type != "direct"
                    or options.get("exchange_type") not in (None, "direct")):
                return send(producer, name, message, **options)
            # What Celery adds for a queue of a direct exchange: it publishes anonymously.
            fields = {**sent_event, "queue": queue.name, "exchange": "",
                      "routing_key": queue.name}
            try:
                encoded = encoder.encode(app, hostname, "task-sent", **fields)
            except Exception as exc:  # Celery sends it then
                logger.warning("could not encode a task-sent event: %r", exc)
                return send(producer, name, message, **options)
            options["headers"] = {**extra_headers,
                                  SUBMIT_HEADER: dataclasses.replace(step, sent_event=encoded)}
            return send(producer, name, (headers, properties, body, None), **options)

        return send_task_message
