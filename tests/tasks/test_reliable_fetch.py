"""Reliable fetch: a consumer killed at any instant loses no message.

Real Redis, real consumer processes SIGKILLed at random instants while they consume as
fast as they can; then one consumer drains the rest (the restore sweep returns what the
killed ones held). Every published message must have been processed at least once.
"""

from __future__ import annotations

import random
import signal
import sys
import time
import uuid
from pathlib import Path

import redis
from kombu import Connection, Exchange, Queue

from pluginpool.pool.processes import ManagedProcess, wait_until
from pluginpool.tasks.reliable_fetch import CLAIM_SOURCE
from pluginpool.tasks.transport import TRANSPORT_PATH

CONSUMER = Path(__file__).with_name("consume_and_record.py")


def publish(url: str, queue_name: str, count: int) -> None:
    queue = Queue(queue_name, Exchange(queue_name, type="direct"), routing_key=queue_name)
    options = {"pluginpool_bell_prefix": f"{queue_name}:bell:"}
    with Connection(url, transport=TRANSPORT_PATH, transport_options=options) as conn:
        producer = conn.Producer(serializer="json")
        for n in range(count):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=queue_name,
                             declare=[queue] if n == 0 else [])


def consumer(url: str, queue: str, done_key: str, log_dir: Path) -> ManagedProcess:
    return ManagedProcess([sys.executable, str(CONSUMER), "--url", url, "--queue", queue,
                           "--done-key", done_key],
                          log_path=log_dir / f"consumer-{uuid.uuid4().hex[:6]}.log")


def test_consumers_killed_at_random_instants_lose_no_message(redis_url: str,
                                                              tmp_path: Path) -> None:
    store = redis.Redis.from_url(redis_url)
    queue, done_key = f"rf-{uuid.uuid4().hex[:8]}", f"rf-done-{uuid.uuid4().hex[:8]}"
    total = 8000
    publish(redis_url, queue, total)
    rng = random.Random(7)
    processes: list[ManagedProcess] = []
    try:
        for _ in range(20):
            proc = consumer(redis_url, queue, done_key, tmp_path)
            processes.append(proc)
            before = store.scard(done_key)
            assert wait_until(lambda n=before: store.scard(done_key) > n, timeout_s=20,
                              interval_s=0.01), proc.log_text()
            time.sleep(rng.uniform(0.0, 0.3))
            proc.signal(signal.SIGKILL)
            proc.stop()
        processed_while_killing = store.scard(done_key)
        assert processed_while_killing < total, "the kills must land while messages remain"
        final = consumer(redis_url, queue, done_key, tmp_path)
        processes.append(final)
        wait_until(lambda: store.scard(done_key) == total, timeout_s=60, interval_s=0.2)
        log = final.log_text()
    finally:
        for proc in processes:
            proc.stop()
    missing = total - store.scard(done_key)
    print(f"20 kills, {processed_while_killing} processed meanwhile, {missing} lost")
    assert missing == 0, f"{missing} of {total} messages lost"
    assert "Traceback" not in log, log
    assert store.llen(queue) == 0


def test_claim_records_the_message_before_it_leaves_redis(redis_url: str) -> None:
    """The script itself: a message is never in neither place, and an item that is not a
    kombu message is handed back unrecorded (the worker dead-letters it)."""
    store = redis.Redis.from_url(redis_url)
    claim = store.register_script(CLAIM_SOURCE)
    prefix = f"rfunit-{uuid.uuid4().hex[:8]}"
    unacked, index, first, second = (f"{prefix}:{name}" for name in
                                     ("unacked", "index", "q1", "q2"))
    raw = ('{"body": "e30=", "properties": {"delivery_tag": "tag-1", '
           '"delivery_info": {"exchange": "ex", "routing_key": "rk"}}}')
    store.lpush(second, raw)
    store.lpush(second, "not json")
    assert claim(keys=[unacked, index, first, second], args=["100.5"]) == [
        second.encode(), raw.encode(), 1]
    assert store.hget(unacked, "tag-1") == f'[{raw},"ex","rk"]'.encode()
    assert store.zscore(index, "tag-1") == 100.5
    assert claim(keys=[unacked, index, first, second], args=["101"]) == [
        second.encode(), b"not json", 0]
    assert store.hlen(unacked) == 1
    assert claim(keys=[unacked, index, first, second], args=["102"]) is None
