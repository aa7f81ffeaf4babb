"""A warm shutdown hands reserved messages back, except a job whose outcome is stored.

With acknowledgement after the run, a job whose run finished as the worker stopped could
have its result stored while its acknowledgement never came (the main process had stopped
reading its pool processes' results): handed back, it ran a second time (seen once in the
rolling-restart test). Real Redis, pluginpool's transport, kombu's channel close.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import kombu
import redis

from pluginpool.pool.stored_outcome import reserved_message_done
from pluginpool.tasks.app import create_app
from pluginpool.tasks.claim_qos import OUTCOME_STORED_OPTION
from pluginpool.tasks.transport import TRANSPORT_PATH
from tests.conftest import make_settings
from tests.tasks.test_consumer_connection_faults import consumer_options, drain_until


def test_a_warm_shutdown_acknowledges_a_reserved_job_whose_outcome_is_stored(
        redis_url: str) -> None:
    name = f"shutdown-{uuid.uuid4().hex[:8]}"
    stored: set[str] = set()
    options = {**consumer_options(name),
               OUTCOME_STORED_OPTION: lambda message: message.headers.get("id") in stored}
    queue = kombu.Queue(name, kombu.Exchange(name, type="direct"), routing_key=name)
    received: list[kombu.Message] = []
    with kombu.Connection(redis_url, transport=TRANSPORT_PATH,
                          transport_options=options) as conn:
        producer = kombu.Producer(conn)
        for job_id in ("ran", "not-ran"):
            producer.publish({"job": job_id}, routing_key=name, serializer="json",
                             headers={"id": job_id}, declare=[queue])
        with kombu.Consumer(conn, [queue], accept=["json"],
                            callbacks=[lambda _body, message: received.append(message)]
                            ) as consumer:
            consumer.qos(prefetch_count=2)
            drain_until(conn, lambda: len(received) == 2)
            assert len(received) == 2, "both messages reserved, neither acknowledged"
            stored.add("ran")  # its run stored the outcome; its ack never came
    # The connection closed as a warm shutdown closes it: reserved messages are restored.
    client = redis.Redis.from_url(redis_url)
    left = [kombu.utils.json.loads(raw)["headers"]["id"]
            for raw in client.lrange(name, 0, -1)]
    assert left == ["not-ran"], "only the job without an outcome goes back to its queue"
    assert not client.hlen(f"{name}:unacked"), "no record is left for either message"


def test_the_workers_check_reads_the_result_backend(redis_url: str) -> None:
    app = create_app(make_settings(redis_url))
    done = reserved_message_done(app)
    job_id = f"job-{uuid.uuid4().hex}"

    def message(headers: Any) -> Any:
        return SimpleNamespace(headers=headers)

    assert not done(message({"id": job_id})), "no outcome stored yet"
    app.backend.mark_as_done(job_id, {"value": 1})
    assert done(message({"id": job_id}))
    assert not done(message({})), "a message without a job id is handed back"
    assert not done(message(None))
