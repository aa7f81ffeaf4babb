"""A bare kombu consumer for the reliable-fetch kill test: records each message it gets
in a Redis set, then acks it. Run as a script; the test SIGKILLs it at random instants."""

from __future__ import annotations

import argparse
import contextlib
import socket

import redis
from kombu import Connection, Consumer, Exchange, Message, Queue

from pluginpool.tasks.transport import TRANSPORT_PATH


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--done-key", required=True)
    parser.add_argument("--plain-kombu", action="store_true",
                        help="kombu's own Redis transport (BRPOP), for comparison")
    args = parser.parse_args()
    store = redis.Redis.from_url(args.url)
    # Unacked keys of its own: a visibility timeout of 1 s must not touch anyone else's.
    options = {"visibility_timeout": 1, "unacked_restore_throttle": 1,
               "unacked_key": f"{args.queue}:unacked",
               "unacked_index_key": f"{args.queue}:unacked_index",
               "unacked_mutex_key": f"{args.queue}:unacked_mutex",
               "pluginpool_bell_prefix": f"{args.queue}:bell:"}
    transport = "redis" if args.plain_kombu else TRANSPORT_PATH
    queue = Queue(args.queue, Exchange(args.queue, type="direct"), routing_key=args.queue)

    def record(body: dict[str, int], message: Message) -> None:
        store.sadd(args.done_key, body["n"])
        message.ack()

    with Connection(args.url, transport=transport, transport_options=options) as conn, \
            Consumer(conn, [queue], callbacks=[record], accept=["json"]) as consumer:
        consumer.qos(prefetch_count=4)
        while True:
            with contextlib.suppress(socket.timeout):
                conn.drain_events(timeout=1)


if __name__ == "__main__":
    main()
