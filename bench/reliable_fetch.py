"""Reliable fetch vs kombu's BRPOP: messages lost when consumers are SIGKILLed, and speed.

Both sides run the same bare kombu consumer (tests/tasks/consume_and_record.py: record the
message in a Redis set, then ack), once with kombu's own Redis transport and once with
pluginpool's. For each round: publish N messages, start a consumer and SIGKILL it at a
random instant, K times, then let one consumer drain the rest (the restore sweep returns
what the killed ones held) and count the messages never processed.
Speed: one consumer drains N messages with no kills, timed from its first message.
Idle latency: a `pluginpool worker` that has been idle gets one no-op job at a time, from
pluginpool's client (rings the queue's bell) and from a plain Celery producer (rings none:
the worker sees it when its idle wait, `PLUGINPOOL_BROKER_IDLE_WAIT_S`, ends).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
from celery import Celery
from kombu import Connection, Exchange, Queue

from bench.common import ROOT, bench_redis_url, median, pluginpool_worker, write_result
from bench.throughput import NOOP
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.transport import TRANSPORT_PATH

CONSUMER = ROOT / "tests" / "tasks" / "consume_and_record.py"


def publish(url: str, queue_name: str, count: int, *, plain: bool) -> None:
    queue = Queue(queue_name, Exchange(queue_name, type="direct"), routing_key=queue_name)
    transport = "redis" if plain else TRANSPORT_PATH
    options = {"pluginpool_bell_prefix": f"{queue_name}:bell:"}
    with Connection(url, transport=transport, transport_options=options) as conn:
        producer = conn.Producer(serializer="json")
        for n in range(count):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=queue_name,
                             declare=[queue] if n == 0 else [])


def consumer(url: str, queue: str, done_key: str, run_dir: Path, *,
             plain: bool) -> ManagedProcess:
    argv = [sys.executable, str(CONSUMER), "--url", url, "--queue", queue,
            "--done-key", done_key] + (["--plain-kombu"] if plain else [])
    return ManagedProcess(argv, log_path=run_dir / f"consumer-{uuid.uuid4().hex[:6]}.log")


def kill_round(url: str, run_dir: Path, *, plain: bool, messages: int, kills: int,
               rng: random.Random) -> tuple[int, int]:
    """(messages processed while killing, messages never processed) after `kills` random
    SIGKILLs and a final drain."""
    store = redis.Redis.from_url(url)
    queue, done_key = f"rfb-{uuid.uuid4().hex[:8]}", f"rfb-done-{uuid.uuid4().hex[:8]}"
    publish(url, queue, messages, plain=plain)
    processes: list[ManagedProcess] = []
    try:
        for _ in range(kills):
            proc = consumer(url, queue, done_key, run_dir, plain=plain)
            processes.append(proc)
            before = store.scard(done_key)
            if not wait_until(lambda before=before: store.scard(done_key) > before,
                              timeout_s=20, interval_s=0.01):
                raise RuntimeError(f"consumer processed nothing:\n{proc.log_text()}")
            time.sleep(rng.uniform(0.0, 0.3))
            proc.signal(signal.SIGKILL)
            proc.stop()
        while_killing = int(store.scard(done_key))
        processes.append(consumer(url, queue, done_key, run_dir, plain=plain))
        # Done when everything is processed, or nothing moved for 5 s after the restore
        # sweep (visibility timeout 1 s) had every chance to bring back what the killed
        # ones held.
        last, still_since = -1, time.monotonic()
        while store.scard(done_key) < messages and time.monotonic() - still_since < 5:
            count = store.scard(done_key)
            if count != last:
                last, still_since = count, time.monotonic()
            time.sleep(0.2)
    finally:
        for proc in processes:
            proc.stop()
    return while_killing, messages - int(store.scard(done_key))


def drain_rate(url: str, run_dir: Path, *, plain: bool, messages: int) -> float:
    store = redis.Redis.from_url(url)
    queue, done_key = f"rfs-{uuid.uuid4().hex[:8]}", f"rfs-done-{uuid.uuid4().hex[:8]}"
    publish(url, queue, messages, plain=plain)
    proc = consumer(url, queue, done_key, run_dir, plain=plain)
    try:
        wait_until(lambda: store.scard(done_key) > 0, timeout_s=30, interval_s=0.001)
        started, first = time.perf_counter(), store.scard(done_key)
        wait_until(lambda: store.scard(done_key) >= messages, timeout_s=120, interval_s=0.005)
        return (store.scard(done_key) - first) / (time.perf_counter() - started)
    finally:
        proc.stop()


def idle_latency(url: str, run_dir: Path, samples: int) -> dict[str, dict[str, float]]:
    """Milliseconds from submit to result for a job reaching an idle worker."""
    settings = Settings(_env_file=None, redis_url=url,  # type: ignore[call-arg]
                        plugin_paths=[str(ROOT / "examples")])
    client = PluginClient(settings)
    client.register(NOOP)
    env = {**os.environ, "PLUGINPOOL_REDIS_URL": url,
           "PLUGINPOOL_PLUGIN_PATHS": json.dumps(settings.plugin_paths)}
    plain = Celery("plain-producer", broker=url, backend=url, set_as_current=False)
    plain.conf.update(task_serializer="json", accept_content=["json"],
                      result_accept_content=["json"])
    worker = pluginpool_worker(client, env, run_dir, plugins=NOOP.id, concurrency=2,
                               node="bench-idle@localhost")
    latencies: dict[str, list[float]] = {"pluginpool_client": [], "plain_celery_producer": []}
    try:
        for i in range(samples):
            for name, values in latencies.items():
                time.sleep(0.3)  # idle: the worker is waiting on its bells
                started = time.perf_counter()
                if name == "pluginpool_client":
                    client.submit(NOOP.id, {"i": i}).result(timeout=30)
                else:
                    plain.send_task(f"plugin.{NOOP.id}", args=[{"i": i}],
                                    queue=f"plugins.{NOOP.id}").get(timeout=30)
                values.append((time.perf_counter() - started) * 1000)
    finally:
        worker.stop()
        client.close()
        plain.close()
    return {name: {"p50_ms": round(median(values), 1), "max_ms": round(max(values), 1)}
            for name, values in latencies.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=8000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--latency-samples", type=int, default=40)
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="pluginpool-bench-"))
    url = bench_redis_url(run_dir)
    rng = random.Random(11)
    lost: dict[str, list[int]] = {"kombu_brpop": [], "pluginpool_reliable_fetch": []}
    rates: dict[str, list[float]] = {name: [] for name in lost}
    for _ in range(args.rounds):
        for name in lost:
            plain = name == "kombu_brpop"
            _, lost_now = kill_round(url, run_dir, plain=plain, messages=args.messages,
                                     kills=args.kills, rng=rng)
            lost[name].append(lost_now)
            rates[name].append(drain_rate(url, run_dir, plain=plain, messages=args.messages))
            print(name, "lost", lost[name][-1], "drain/s", round(rates[name][-1]), flush=True)
    latency = idle_latency(url, run_dir, args.latency_samples)
    write_result("reliable_fetch", {
        "benchmark": "messages lost to consumer SIGKILLs, and drain rate, kombu BRPOP vs "
                     "pluginpool reliable fetch (same consumer, prefetch 4)",
        "rounds": args.rounds, "messages_per_round": args.messages,
        "kills_per_round": args.kills,
        "lost_per_round": lost,
        "lost_total": {name: sum(values) for name, values in lost.items()},
        "drain_msgs_per_s_median": {name: round(median(v), 1) for name, v in rates.items()},
        "drain_msgs_per_s_all": {name: [round(x, 1) for x in v] for name, v in rates.items()},
        "idle_worker_latency_ms": latency,
        "idle_wait_s": Settings(_env_file=None).broker_idle_wait_s,  # type: ignore[call-arg]
    })


if __name__ == "__main__":
    main()
