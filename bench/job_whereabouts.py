"""Where a job that has no outcome is: so a benchmark that times out explains itself.

A job waited on past its bound is somewhere on the delivery path (tasks/reliable_fetch.py):
still on its queue list (and then: is the list in a ready index, does any group wait on
it), claimed and held unacknowledged (by which consumer, is its heartbeat alive, how many
deliveries), set aside as a dead letter, or done with its result stored (then the waiter
missed it). `whereabouts` reads each of these places once, from the broker's Redis, and
says which hold the job; `describe` puts it in one line for a log.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from pluginpool.policy.keys import RedisKeys
from pluginpool.policy.redis_text import as_text
from pluginpool.tasks.job_status import in_order
from pluginpool.tasks.retire import job_id_of, queue_lists

UNACKED = "unacked"
"""kombu's unacknowledged hash (delivery tag -> [message, exchange, routing key])."""
RESULT_PREFIX = "celery-task-meta-"


def whereabouts(store: redis.Redis, keys: RedisKeys, *, job_id: str,
                queue: str) -> dict[str, Any]:
    """Every place on the delivery path that holds `job_id` now (see the module doc)."""
    found: dict[str, Any] = {"job_id": job_id, "queue": queue}
    raw_result = store.get(RESULT_PREFIX + job_id)
    found["result_status"] = json.loads(raw_result)["status"] if raw_result else None
    changes = in_order(store.hgetall(keys.job_status(job_id)))
    found["job_status"] = [change.get("status") for change in changes]
    lists: dict[str, Any] = {}
    for name in queue_lists(queue):
        items = store.lrange(name, 0, -1)
        hits = [index for index, raw in enumerate(items) if job_id_of(raw) == job_id]
        if items or hits:
            lists[name] = {"length": len(items), "job_at": hits}
    found["queue_lists"] = lists
    ready: dict[str, Any] = {}
    for key in store.scan_iter(match=keys.ready_prefix + "*", count=1000):
        for name in queue_lists(queue):
            score = store.zscore(key, name)
            if score is not None:
                ready.setdefault(as_text(key), {})[name] = {
                    "score": score, "rank": store.zrank(key, name),
                    "size": store.zcard(key)}
    found["ready_index"] = ready
    found["waiters"] = sorted(as_text(group) for group in store.smembers(
        keys.waiters_prefix + queue))
    now = time.time()
    beats = {as_text(consumer): round(now - score, 1) for consumer, score in
             store.zrange(keys.consumers, 0, -1, withscores=True)}
    held = []
    for tag, entry in store.hscan_iter(UNACKED, count=1000):
        try:
            message = json.dumps(json.loads(entry)[0])
        except (ValueError, IndexError, TypeError):
            continue
        if job_id_of(message.encode()) == job_id:
            owner = store.hget(keys.delivery_owner, tag)
            held.append({
                "tag": as_text(tag), "owner": as_text(owner) if owner else None,
                "owner_beat_age_s": beats.get(as_text(owner)) if owner else None,
                "deliveries": as_text(store.hget(keys.deliveries, tag) or b"0"),
                "since_s": round(now - (store.zscore("unacked_index", tag) or now), 1)})
    found["unacked"] = held
    found["dead_letters"] = [as_text(entry_id) for entry_id, entry
                             in store.hscan_iter(keys.dead_letter, count=1000)
                             if job_id in as_text(entry)]
    found["consumers_beat_age_s"] = beats
    return found


def describe(found: dict[str, Any]) -> str:
    """One line: where the job is, then everything read."""
    places = []
    if found["result_status"]:
        places.append(f"result stored ({found['result_status']}): the waiter missed it")
    if any(info["job_at"] for info in found["queue_lists"].values()):
        indexed = "indexed" if found["ready_index"] else "NOT in any ready index"
        places.append(f"still queued, {indexed}, waiters {found['waiters']}")
    if found["unacked"]:
        places.append(f"held unacknowledged: {found['unacked']}")
    if found["dead_letters"]:
        places.append("dead-lettered")
    where = "; ".join(places) or "nowhere on the delivery path"
    return f"job {found['job_id']}: {where}. Read: {json.dumps(found, default=str)}"
