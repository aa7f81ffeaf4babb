"""Reliable fetch: a consumer killed at any instant loses no message.

Real Redis, real consumer processes SIGKILLed at random instants while they consume as
fast as they can; then one consumer drains the rest (the restore sweep returns what the
killed ones held). Every published message must have been processed at least once.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import kombu
import redis

from bench.reliable_fetch import kill_round
from pluginpool.tasks.delivery_record import HANDBACK, PUBLISH, RESCUE
from pluginpool.tasks.reliable_fetch import CLAIM_SOURCE
from pluginpool.tasks.transport import TRANSPORT_PATH
from tests.conftest import CHAOS_SCALE
from tests.tasks.test_consumer_connection_faults import consumer_options, drain_until


def test_consumers_killed_at_random_instants_lose_no_message(redis_url: str,
                                                              tmp_path: Path) -> None:
    """20 consumers in turn, each SIGKILLed at a random instant while it consumes 8,000
    messages as fast as it can, then a last one drains the rest. (kombu's own transport
    loses some 5 to 11 messages this way: python -m bench.reliable_fetch.)"""
    total = 4000 * CHAOS_SCALE
    kills = 10 * CHAOS_SCALE
    while_killing, lost = kill_round(redis_url, tmp_path, plain=False, messages=total,
                                     kills=kills, rng=random.Random(7))
    print(f"{kills} kills, {while_killing} processed meanwhile, {lost} lost")
    assert while_killing < total, "the kills must land while messages remain"
    assert lost == 0, f"{lost} of {total} messages lost"
    logs = "".join(path.read_text() for path in tmp_path.glob("consumer-*.log"))
    assert "Traceback" not in logs, logs[-3000:]


class ClaimHarness:
    """claim.lua, publish.lua and rescue.lua on their own, with keys of one test."""

    def __init__(self, store: redis.Redis, name: str) -> None:
        self.store = store
        self.prefix = f"{name}-{uuid.uuid4().hex[:8]}:"
        self.claim = store.register_script(CLAIM_SOURCE)
        self.publish = store.register_script(PUBLISH.source)
        self.rescue = store.register_script(RESCUE.source)
        self.handback = store.register_script(HANDBACK.source)

    def key(self, name: str) -> str:
        return self.prefix + name

    def consume(self, consumer: str, group: str, *queues: str) -> None:
        self.store.sadd(self.key(f"consumes:{consumer}"), *[self.key(q) for q in queues])
        for queue in queues:
            self.store.sadd(self.key(f"waiters:{queue}"), group)

    def push(self, queue: str, raw: str, *, front: bool = False) -> None:
        self.publish(keys=[self.key(queue), self.key(f"waiters:{queue}")],
                     args=[raw, "R" if front else "L", self.key("ready:"), self.key("wake:"), 64])

    def record_keys(self, consumer: str) -> list[str]:
        return [self.key(n) for n in ("unacked", "index", "count", "owner",
                                      f"held:{consumer}", "dl", "dlindex", "beats")]

    def take(self, consumer: str, group: str, *, now: str = "100.5", max_deliveries: int = 3,
             dirty: tuple[str, ...] = ()) -> list[object]:
        keys = [*self.record_keys(consumer), self.key(f"ready:{group}"),
                self.key(f"consumes:{consumer}"), self.key("outcome-pending")]
        for queue in dirty:
            keys += [self.key(queue), self.key(f"waiters:{queue}")]
        return self.claim(keys=keys, args=[now, consumer, max_deliveries, 100, "1",
                                           self.key("ready:"), self.key("wake:"), 64, 64])


def message(tag: str, routing_key: str = "rk") -> str:
    return ('{"body": "e30=", "properties": {"delivery_tag": "' + tag + '", '
            '"delivery_info": {"exchange": "ex", "routing_key": "' + routing_key + '"}}}')


def test_claim_records_the_message_before_it_leaves_redis(redis_url: str) -> None:
    """The script itself: a message is never in neither place, its record names its
    consumer, and an item that is not a kombu message is handed back unrecorded (the
    worker dead-letters it)."""
    h = ClaimHarness(redis.Redis.from_url(redis_url), "rfunit")
    h.consume("me", "g", "q1", "q2")
    raw = message("tag-1")
    h.push("q2", raw)
    h.push("q2", "not json")
    q2 = h.key("q2").encode()
    assert h.take("me", "g") == [q2, raw.encode(), 1, b"tag-1"]
    assert h.store.hget(h.key("unacked"), "tag-1") == f'[{raw},"ex","rk"]'.encode()
    assert h.store.zscore(h.key("index"), "tag-1") == 100.5
    assert h.store.hget(h.key("count"), "tag-1") == b"1"
    assert h.store.hget(h.key("owner"), "tag-1") == b"me"
    assert h.store.hgetall(h.key("held:me")) == {b"tag-1": q2}
    assert h.store.zscore(h.key("beats"), "me") == 100.5
    assert h.take("me", "g", now="101") == [q2, b"not json", 0, b""]
    assert h.store.hlen(h.key("unacked")) == 1
    assert h.take("me", "g", now="102") == [b"", b"", -1, b""]
    assert h.store.zcard(h.key("ready:g")) == 0, "an emptied queue leaves the index"


def test_claim_finds_unindexed_pushes_it_is_told_about(redis_url: str) -> None:
    """A plain producer's LPUSH is not indexed; a keyspace notification or a rescan hands
    the list to the claim, which indexes it before it looks."""
    h = ClaimHarness(redis.Redis.from_url(redis_url), "rfdirty")
    h.consume("me", "g", "q")
    h.store.lpush(h.key("q"), message("plain"))
    assert h.take("me", "g")[2] == -1
    assert h.take("me", "g", dirty=("q",))[3] == b"plain"


def test_ready_queues_are_served_round_robin(redis_url: str) -> None:
    """Fairness: a queue with a deep backlog gets one claim in turn with every other ready
    queue, never all of them."""
    h = ClaimHarness(redis.Redis.from_url(redis_url), "rffair")
    h.consume("me", "g", "deep", "a", "b")
    for i in range(50):
        h.push("deep", message(f"d{i}"))
    h.push("a", message("a0"))
    h.push("b", message("b0"))
    served = [bytes(h.take("me", "g")[0]).decode().rsplit(":", 1)[1] for _ in range(6)]
    assert served[:3].count("deep") == 1 and set(served[:3]) == {"deep", "a", "b"}
    assert served[3:] == ["deep"] * 3


def test_claim_quarantines_a_message_delivered_too_often(redis_url: str) -> None:
    """The poison rule: the (max + 1)th claim of one delivery tag sets it aside with its
    history instead of delivering it, and claims the next message in the same call."""
    h = ClaimHarness(redis.Redis.from_url(redis_url), "rfpoison")
    h.consume("c0", "g", "q")
    h.consume("c1", "g", "q")
    h.consume("c2", "g", "q")
    poison, good = message("p"), message("g")
    for attempt in range(2):
        h.push("q", poison, front=True)  # its consumer died: returned to the front
        assert h.take(f"c{attempt}", "g", now=str(attempt), max_deliveries=2)[3] == b"p"
    h.push("q", poison, front=True)
    h.push("q", good)
    reply = h.take("c2", "g", now="5", max_deliveries=2)
    assert reply[3:] == [b"g", b"p"]  # delivered the good one, quarantined the poison
    assert h.store.smembers(h.key("outcome-pending")) == {b"p"}, "its outcome is owed"
    entry = json.loads(h.store.hget(h.key("dl"), "p"))
    assert entry["deliveries"] == 2 and entry["last_consumer"] == "c1"
    assert entry["first_seen"] == 0 and entry["raw"] == poison
    assert h.store.zscore(h.key("dlindex"), "p") == 5
    assert not h.store.hexists(h.key("count"), "p")
    assert h.store.hexists(h.key("unacked"), "g")


def test_a_dead_consumers_messages_are_returned_once_by_concurrent_rescuers(
        redis_url: str) -> None:
    """rescue.lua: what a consumer past its heartbeat bound held goes back to the front of
    its queue, verbatim and indexed, exactly once however many workers rescue at the same
    time; a consumer that beat again meanwhile is left alone."""
    h = ClaimHarness(redis.Redis.from_url(redis_url), "rfrescue")
    h.consume("dead", "g", "q")
    raws = [message(f"t{i}", "a/b") for i in range(3)]
    for raw in raws:
        h.push("q", raw)
    for _ in raws:
        h.take("dead", "g", now="10")
    assert h.store.llen(h.key("q")) == 0 and h.store.hlen(h.key("unacked")) == 3
    keys = [h.key(n) for n in ("unacked", "index", "owner", "held:dead", "beats", "stats",
                                "consumes:dead")]
    args = [h.prefix, h.key("waiters:"), h.key("ready:"), h.key("wake:"), 64]
    assert h.rescue(keys=keys, args=["dead", "5", *args]) == -1  # beat at 10: alive at 5
    returned = [h.rescue(keys=keys, args=["dead", "50", *args]) for _ in range(3)]
    assert returned == [3, 0, 0]
    assert sorted(h.store.lrange(h.key("q"), 0, -1)) == sorted(raw.encode() for raw in raws)
    assert h.store.hlen(h.key("unacked")) == 0 and not h.store.exists(h.key("held:dead"))
    assert h.store.hget(h.key("count"), "t0") == b"1", "the count survives for the poison rule"
    assert h.store.hget(h.key("stats"), "rescued") == b"3"
    assert h.store.zcard(h.key("ready:g")) == 1, "the returned queue is ready again"


def test_queues_a_consumer_does_not_serve_never_hide_one_it_does(redis_url: str) -> None:
    """More ready queues that this consumer does not consume (plugins disabled with jobs
    waiting, in a group that serves them otherwise) than the claim reads at a time, all
    ahead of a queue it does consume: it claims that queue's message, leaves theirs queued
    and indexed for those that serve them, and drops from the index those that are empty."""
    h = ClaimHarness(redis.Redis.from_url(redis_url), "rfstale")
    stale = [f"off{i:03d}" for i in range(150)]
    h.consume("other", "g", *stale)  # a member of the group that serves them
    h.consume("me", "g", "on")
    for queue in stale:
        h.push(queue, message(f"t-{queue}"))
    h.store.rpop(h.key(stale[-1]))  # taken by someone: its entry is stale and empty
    time.sleep(0.005)  # "on" becomes ready after them all
    h.push("on", message("mine"))
    assert h.take("me", "g")[3] == b"mine"
    assert all(h.store.llen(h.key(queue)) == 1 for queue in stale[:-1])
    ready = {raw.decode() for raw in h.store.zrange(h.key("ready:g"), 0, -1)}
    assert ready == {h.key(queue) for queue in stale[:-1]}
    # Deferred behind what becomes ready meanwhile: the next claim does not meet them again.
    deferred = dict(h.store.zrange(h.key("ready:g"), 0, -1, withscores=True))
    assert min(deferred.values()) >= time.time() * 1000 + 2_000
    h.push("on", message("mine-2"))
    assert h.take("me", "g")[3] == b"mine-2"
    assert dict(h.store.zrange(h.key("ready:g"), 0, -1, withscores=True)) == deferred
    assert h.take("me", "g")[2] == -1
    assert h.take("other", "g")[3] == b"t-off000", "the others still serve theirs in order"


def test_a_hand_back_returns_the_message_and_drops_its_record_in_one_step(
        redis_url: str) -> None:
    """handback.lua: a live consumer's requeue (behind the others) or warm shutdown (in
    front) puts the message back verbatim, indexed, its record gone and its delivery
    uncounted, in one step (two round trips left a window where a consumer killed in
    between left the message unacked with no owner, out of every rescue's reach for the
    visibility timeout). A consumer whose message was rescued and claimed by another hands
    back nothing."""
    h = ClaimHarness(redis.Redis.from_url(redis_url), "rfhandback")
    h.consume("me", "g", "q")
    h.consume("other", "g", "q")
    first, second = message("t1"), message("t2")
    h.push("q", first)
    h.push("q", second)
    assert h.take("me", "g")[3] == b"t1"

    def hand_back(consumer: str, tag: str, where: str) -> object:
        return h.handback(keys=[h.key(n) for n in ("unacked", "index", "count", "owner",
                                                   f"held:{consumer}")],
                          args=[tag, consumer, where, h.prefix, h.key("waiters:"),
                                h.key("ready:"), h.key("wake:"), 64])

    assert hand_back("me", "t1", "back") == 1
    assert h.store.lrange(h.key("q"), 0, -1) == [first.encode(), second.encode()]
    assert h.store.zscore(h.key("ready:g"), h.key("q")) is not None
    assert not h.store.hexists(h.key("unacked"), "t1")
    assert not h.store.hexists(h.key("owner"), "t1")
    assert not h.store.hexists(h.key("held:me"), "t1")
    assert h.store.hget(h.key("count"), "t1") == b"0"
    assert h.take("me", "g")[3] == b"t2"
    assert hand_back("me", "t2", "front") == 1
    assert h.store.lrange(h.key("q"), 0, -1) == [first.encode(), second.encode()]
    assert h.take("me", "g")[3] == b"t2", "handed back in front: next out"
    # "me" is declared dead: its message goes back and "other" claims it.
    keys = [h.key(n) for n in ("unacked", "index", "owner", "held:me", "beats", "stats",
                                "consumes:me")]
    assert h.rescue(keys=keys, args=["me", "1e12", h.prefix, h.key("waiters:"),
                                     h.key("ready:"), h.key("wake:"), 64]) == 1
    assert h.take("other", "g")[3] == b"t2"
    # "me" is back and hands t2 back (a warm shutdown): its held entries are gone with the
    # rescue, and t2 is "other"'s now: nothing is pushed, "other"'s record stays whole.
    assert not h.store.hexists(h.key("held:me"), "t2")
    waiting = h.store.lrange(h.key("q"), 0, -1)
    assert hand_back("me", "t2", "front") == 0
    assert h.store.lrange(h.key("q"), 0, -1) == waiting, \
        "nothing pushed while another consumer runs it"
    assert h.store.hget(h.key("owner"), "t2") == b"other", "the new holder's record stays"
    assert h.store.hexists(h.key("unacked"), "t2")
    assert h.store.hexists(h.key("held:other"), "t2")
    # The same after a rescue nobody has claimed from yet: the message waits on its queue.
    h.store.hset(h.key("held:other"), "t2", h.key("q"))
    keys = [h.key(n) for n in ("unacked", "index", "owner", "held:other", "beats", "stats",
                                "consumes:other")]
    assert h.rescue(keys=keys, args=["other", "1e12", h.prefix, h.key("waiters:"),
                                     h.key("ready:"), h.key("wake:"), 64]) == 1
    assert hand_back("other", "t2", "front") == 0
    assert h.store.lrange(h.key("q"), 0, -1).count(second.encode()) == 1, \
        "once on its queue, not twice"
    # A message kombu recorded itself (an unacked entry with no owner) is kombu's to restore.
    h.store.hset(h.key("unacked"), "kombu-only", "[{}, \"\", \"q\"]")
    assert hand_back("me", "kombu-only", "back") == -1
    assert hand_back("me", "never-claimed", "back") == 0


def plain_push_found(redis_url: str, *, idle_wait_s: float, broadcast: bool,
                     prefix: str | None = None) -> tuple[bool, float]:
    """A consumer through pluginpool's transport (kombu's wait, brpop_timeout, at 10 s; a
    broadcast queue beside its queue if asked), then one message LPUSHed by kombu's own
    transport, which neither indexes it nor rings a bell: whether the consumer counted on
    keyspace events, and how long it took to find the message."""
    name = f"kev-{uuid.uuid4().hex[:8]}"
    options: dict[str, Any] = {**consumer_options(name), "pluginpool_idle_wait_s": idle_wait_s}
    if prefix is not None:
        options["global_keyprefix"] = prefix
    queue = kombu.Queue(name, kombu.Exchange(name, type="direct"), routing_key=name)
    queues = [queue]
    if broadcast:
        queues.append(kombu.Queue(f"{name}-bc", kombu.Exchange(f"{name}-bc", type="fanout")))
    received: list[Any] = []
    with kombu.Connection(redis_url, transport=TRANSPORT_PATH,
                          transport_options=options) as conn:
        conn.transport.brpop_timeout = 10
        channel = conn.channel()
        kombu.Consumer(channel, queues, accept=["json"], callbacks=[
            lambda body, message: (received.append(body), message.ack())]).consume()
        for _ in range(2):  # the start's full rescan, then the subscription if any
            with contextlib.suppress(socket.timeout):
                conn.drain_events(timeout=0.5)
        heard = channel._keyevents_heard()
        plain_options = {"global_keyprefix": prefix} if prefix is not None else {}
        with kombu.Connection(redis_url, transport_options=plain_options) as plain:
            kombu.Producer(plain).publish({"n": 1}, routing_key=name, serializer="json",
                                          declare=[queue])
        started = time.monotonic()
        drain_until(conn, lambda: bool(received), timeout_s=30)
        waited = time.monotonic() - started
    assert received == [{"n": 1}]
    return heard, waited


def test_a_consumer_without_a_broadcast_queue_finds_a_plain_push_after_its_idle_wait(
        redis_url: str) -> None:
    """Keyspace events reach a connection only through a channel listening for broadcasts
    (kombu subscribes there). A connection without one (a producer waiting on its reply
    queue, a worker without remote control) must not wait the long `brpop_timeout` as if
    it would hear of a push: it rescans after each idle wait. (It used to sleep the full
    wait and rescan a slice a second: a plain Celery worker's ping reply took seconds.)"""
    heard, waited = plain_push_found(redis_url, idle_wait_s=0.2, broadcast=False)
    assert not heard
    assert waited < 5, f"found after {waited:.1f} s: the 10 s wait was slept through"


def test_a_consumer_with_a_broadcast_queue_hears_a_plain_push_at_once(redis_url: str) -> None:
    """The other side: a connection that listens for broadcasts (as every Celery worker
    with remote control does) is told of a plain producer's push by a keyspace event, and
    finds it long before its 10 s waits or idle rescans would."""
    heard, waited = plain_push_found(redis_url, idle_wait_s=10, broadcast=True)
    assert heard
    assert waited < 5, f"found after {waited:.1f} s: the keyspace event was not heard"


def test_with_a_global_keyprefix_a_plain_push_is_found_by_the_idle_rescan(
        redis_url: str) -> None:
    """kombu's prefixed pub/sub client prefixes the keyevent channels too, where Redis never
    publishes: such a connection does not count on them, and finds a plain producer's push
    after its idle wait, not after kombu's 10 s wait."""
    heard, waited = plain_push_found(redis_url, idle_wait_s=0.2, broadcast=True,
                                     prefix=f"kevpfx-{uuid.uuid4().hex[:8]}:")
    assert not heard
    assert waited < 5, f"found after {waited:.1f} s"
