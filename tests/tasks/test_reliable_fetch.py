"""Reliable fetch: a consumer killed at any instant loses no message.

Real Redis, real consumer processes SIGKILLed at random instants while they consume as
fast as they can; then one consumer drains the rest (the restore sweep returns what the
killed ones held). Every published message must have been processed at least once.
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import redis

from bench.reliable_fetch import kill_round
from pluginpool.tasks.delivery_record import RESCUE
from pluginpool.tasks.reliable_fetch import CLAIM_SOURCE


def test_consumers_killed_at_random_instants_lose_no_message(redis_url: str,
                                                              tmp_path: Path) -> None:
    """20 consumers in turn, each SIGKILLed at a random instant while it consumes 8,000
    messages as fast as it can, then a last one drains the rest. (kombu's own transport
    loses some 5 to 11 messages this way: python -m bench.reliable_fetch.)"""
    total = 8000
    while_killing, lost = kill_round(redis_url, tmp_path, plain=False, messages=total,
                                     kills=20, rng=random.Random(7))
    print(f"20 kills, {while_killing} processed meanwhile, {lost} lost")
    assert while_killing < total, "the kills must land while messages remain"
    assert lost == 0, f"{lost} of {total} messages lost"
    logs = "".join(path.read_text() for path in tmp_path.glob("consumer-*.log"))
    assert "Traceback" not in logs, logs[-3000:]


def test_claim_records_the_message_before_it_leaves_redis(redis_url: str) -> None:
    """The script itself: a message is never in neither place, its record names its
    consumer, and an item that is not a kombu message is handed back unrecorded (the
    worker dead-letters it)."""
    store = redis.Redis.from_url(redis_url)
    claim = store.register_script(CLAIM_SOURCE)
    prefix = f"rfunit-{uuid.uuid4().hex[:8]}"
    names = ("unacked", "index", "count", "owner", "held", "dl", "dlindex", "beats", "q1",
             "q2")
    keys = [f"{prefix}:{name}" for name in names]
    unacked, index, count, owner, held, _, _, beats, _, second = keys
    raw = ('{"body": "e30=", "properties": {"delivery_tag": "tag-1", '
           '"delivery_info": {"exchange": "ex", "routing_key": "rk"}}}')
    store.lpush(second, raw)
    store.lpush(second, "not json")
    args = ["100.5", "me", 3, 100, "1"]
    assert claim(keys=keys, args=args) == [second.encode(), raw.encode(), 1, b"tag-1"]
    assert store.hget(unacked, "tag-1") == f'[{raw},"ex","rk"]'.encode()
    assert store.zscore(index, "tag-1") == 100.5
    assert store.hget(count, "tag-1") == b"1"
    assert store.hget(owner, "tag-1") == b"me"
    assert store.hgetall(held) == {b"tag-1": second.encode()}
    assert store.zscore(beats, "me") == 100.5
    assert claim(keys=keys, args=["101", "me", 3, 100, "1"]) == [
        second.encode(), b"not json", 0, b""]
    assert store.hlen(unacked) == 1
    assert claim(keys=keys, args=["102", "me", 3, 100, "1"]) == [b"", b"", -1, b""]


def test_claim_quarantines_a_message_delivered_too_often(redis_url: str) -> None:
    """The poison rule: the (max + 1)th claim of one delivery tag sets it aside with its
    history instead of delivering it, and claims the next message in the same call."""
    store = redis.Redis.from_url(redis_url)
    claim = store.register_script(CLAIM_SOURCE)
    prefix = f"rfpoison-{uuid.uuid4().hex[:8]}"
    names = ("unacked", "index", "count", "owner", "held", "dl", "dlindex", "beats", "q")
    keys = [f"{prefix}:{name}" for name in names]
    unacked, _, count, _, _, dl, dlindex, _, queue = keys
    poison = ('{"body": "", "properties": {"delivery_tag": "p", '
              '"delivery_info": {"exchange": "", "routing_key": "q"}}}')
    good = poison.replace('"p"', '"g"')
    for attempt in range(2):
        store.rpush(queue, poison)  # its consumer died: the sweep put it back
        assert claim(keys=keys, args=[str(attempt), f"c{attempt}", 2, 100, "1"])[3] == b"p"
    store.rpush(queue, poison)
    store.lpush(queue, good)
    reply = claim(keys=keys, args=["5", "c2", 2, 100, "1"])
    assert reply[3:] == [b"g", b"p"]  # delivered the good one, quarantined the poison
    entry = json.loads(store.hget(dl, "p"))
    assert entry["deliveries"] == 2 and entry["last_consumer"] == "c1"
    assert entry["first_seen"] == 0 and entry["raw"] == poison
    assert store.zscore(dlindex, "p") == 5
    assert not store.hexists(count, "p") and store.hexists(unacked, "g")


def test_a_dead_consumers_messages_are_returned_once_by_concurrent_rescuers(
        redis_url: str) -> None:
    """rescue.lua: what a consumer past its heartbeat bound held goes back to the front of
    its queue, verbatim, exactly once however many workers rescue at the same time; a
    consumer that beat again meanwhile is left alone."""
    store = redis.Redis.from_url(redis_url)
    claim = store.register_script(CLAIM_SOURCE)
    rescue = store.register_script(RESCUE.source)
    prefix = f"rfrescue-{uuid.uuid4().hex[:8]}"
    names = ("unacked", "index", "count", "owner", "held", "dl", "dlindex", "beats", "stats",
             "q")
    unacked, index, count, owner, held, dl, dlindex, beats, stats, queue = (
        f"{prefix}:{name}" for name in names)
    raws = ['{"body": "", "properties": {"delivery_tag": "t' + str(i) + '", '
            '"delivery_info": {"exchange": "", "routing_key": "a/b"}}}' for i in range(3)]
    store.lpush(queue, *raws)
    for _ in raws:
        claim(keys=[unacked, index, count, owner, held, dl, dlindex, beats, queue],
              args=["10", "dead", 3, 100, "1"])
    assert store.llen(queue) == 0 and store.hlen(unacked) == 3
    keys = [unacked, index, owner, held, beats, stats]
    assert rescue(keys=keys, args=["dead", "5"]) == -1  # beat at 10: alive at bound 5
    returned = [rescue(keys=keys, args=["dead", "50"]) for _ in range(3)]
    assert returned == [3, 0, 0]
    assert sorted(store.lrange(queue, 0, -1)) == sorted(raw.encode() for raw in raws)
    assert store.hlen(unacked) == 0 and not store.exists(held)
    assert store.hget(count, "t0") == b"1", "the delivery count survives for the poison rule"
    assert store.hget(stats, "rescued") == b"3"
