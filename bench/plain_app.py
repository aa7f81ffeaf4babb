"""A plain Celery app with a no-op task: the baseline pluginpool is measured against."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

BROKER = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
RELIABLE = os.environ.get("BENCH_PLAIN_RELIABLE") == "1"

app = Celery("plain", broker=BROKER, backend=BROKER)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
if RELIABLE:
    # The same delivery guarantees pluginpool configures.
    app.conf.update(task_acks_late=True, task_reject_on_worker_lost=True,
                    worker_prefetch_multiplier=1, worker_send_task_events=True,
                    task_send_sent_event=True)


@app.task(name="bench.noop")
def noop(payload: Any) -> Any:
    return payload
