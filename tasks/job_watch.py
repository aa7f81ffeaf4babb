"""Following jobs' statuses for a synchronous client: one pub/sub connection and one thread
per client, however many jobs it follows.

Each follower gets every change once, in order: on each subscription confirmation (the
first, and again after a reconnect) the thread reads the job's stored changes and delivers
those past the follower's last sequence number; a published change that skips a number
makes it read them again. Followers of a job that ended are dropped and the channel
unsubscribed. A callback that raises is logged and never stops the others.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import redis

from pluginpool.policy.errors import PluginPoolError
from pluginpool.policy.keys import RedisKeys
from pluginpool.policy.redis_text import as_text
from pluginpool.tasks.job_status import TERMINAL, JobStatusStore, decode_change

if TYPE_CHECKING:
    from pluginpool.tasks.jobs import Job

logger = logging.getLogger("pluginpool.job_watch")

StatusCallback = Callable[[dict[str, Any]], None]
ResultCallback = Callable[[Any], None]
ErrorCallback = Callable[[BaseException], None]
IDLE_WAIT_S = 0.05
"""How long the thread waits on the socket before it takes new subscriptions (local)."""


@dataclass
class Follower:
    """One callback on one job, and the last change it was given."""

    job_id: str
    callback: StatusCallback
    last_seq: int = 0
    done: bool = False


def deliver(follower: Follower, change: dict[str, Any],
            history: Callable[[], list[dict[str, Any]]]) -> None:
    """Give `change`, and any change it skipped, to the follower once each, in order."""
    seq = int(change.get("seq", 0))
    if follower.done or seq <= follower.last_seq:
        return
    changes = [change] if seq == follower.last_seq + 1 else history()
    for item in changes:
        item_seq = int(item.get("seq", 0))
        if follower.done or item_seq <= follower.last_seq:
            continue
        follower.last_seq = item_seq
        follower.done = item.get("status") in TERMINAL
        try:
            follower.callback(item)
        except Exception:
            logger.exception("job status callback %r failed", follower.callback)


def outcome_callback(job: Job, *, on_result: ResultCallback | None,
                     on_error: ErrorCallback | None) -> StatusCallback:
    """A status callback that reads the stored outcome when the job ends and hands it on."""
    def on_change(change: dict[str, Any]) -> None:
        if change.get("status") not in TERMINAL:
            return
        try:
            value = job.stored_outcome()
        except PluginPoolError as exc:
            if on_error is not None:
                on_error(exc)
            elif not hasattr(exc, "info"):  # not the job's own error: say so
                logger.warning("job %s ended but its outcome is unreadable: %s", job.id, exc)
            return
        if on_result is not None:
            on_result(value)
    return on_change


class JobWatcher:
    """Job status subscriptions of one client."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, *, ttl_s: int) -> None:
        self._client = client
        self._keys = keys
        self.store = JobStatusStore(client, keys, ttl_s=ttl_s)
        self._lock = threading.Lock()
        self._followers: dict[str, list[Follower]] = {}
        self._confirmed: set[str] = set()
        self._to_subscribe: set[str] = set()
        self._to_catch_up: list[Follower] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def status(self, job_id: str) -> str | None:
        return self.store.current(job_id)

    def follow(self, job_id: str, callback: StatusCallback) -> None:
        """Deliver every change of the job, from the first, to `callback`."""
        channel = self._keys.job_channel(job_id)
        follower = Follower(job_id, callback)
        with self._lock:
            self._followers.setdefault(channel, []).append(follower)
            if channel in self._confirmed:
                self._to_catch_up.append(follower)
            else:
                self._to_subscribe.add(channel)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pluginpool-jobs",
                                                daemon=True)
                self._thread.start()

    def follow_outcome(self, job: Job, *, on_result: ResultCallback | None = None,
                       on_error: ErrorCallback | None = None) -> None:
        self.follow(job.id, outcome_callback(job, on_result=on_result, on_error=on_error))

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- the subscriber thread --------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
            try:
                self._serve(pubsub)
            except redis.RedisError as exc:
                logger.warning("job status subscription lost (%r); reconnecting", exc)
                with self._lock:  # subscribe again; the confirmation catches each job up
                    self._to_subscribe |= set(self._followers)
                    self._confirmed.clear()
                self._stopping.wait(0.5)
            finally:
                pubsub.close()

    def _serve(self, pubsub: Any) -> None:
        while not self._stopping.is_set():
            with self._lock:
                subscribe, self._to_subscribe = self._to_subscribe, set()
                catch_up, self._to_catch_up = self._to_catch_up, []
            if subscribe:
                pubsub.subscribe(*subscribe)
            for follower in catch_up:
                self._catch_up([follower])
                self._prune(pubsub, self._keys.job_channel(follower.job_id))
            if not pubsub.subscribed:
                self._stopping.wait(IDLE_WAIT_S)
                continue
            message = pubsub.get_message(timeout=IDLE_WAIT_S)
            if message is not None:
                self._on_message(pubsub, message)

    def _on_message(self, pubsub: Any, message: dict[str, Any]) -> None:
        channel = as_text(message["channel"])
        with self._lock:
            followers = list(self._followers.get(channel, []))
        if message["type"] == "subscribe":
            with self._lock:
                self._confirmed.add(channel)
            self._catch_up(followers)
        elif message["type"] == "message":
            change = decode_change(message["data"])
            for follower in followers:
                deliver(follower, change, partial(self.store.history, follower.job_id))
        else:
            return
        self._prune(pubsub, channel)

    def _prune(self, pubsub: Any, channel: str) -> None:
        """Drop the followers of a job that ended; unsubscribe when none is left."""
        with self._lock:
            remaining = [f for f in self._followers.get(channel, []) if not f.done]
            if remaining or channel not in self._followers:
                self._followers[channel] = remaining
                return
            del self._followers[channel]
            self._confirmed.discard(channel)
        pubsub.unsubscribe(channel)

    def _catch_up(self, followers: list[Follower]) -> None:
        for follower in followers:
            history = self.store.history(follower.job_id)
            if history:
                deliver(follower, history[-1], partial(list, history))
