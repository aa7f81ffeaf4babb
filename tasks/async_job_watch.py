"""Following jobs' statuses on an event loop: one redis.asyncio pub/sub connection and one
reader task per client, however many jobs are awaited; no thread.

The same rules as the threaded watcher (`job_watch.py`, whose `deliver` it uses): each
follower gets every change once, in order, caught up from the stored changes on each
subscription confirmation. Callbacks are coroutines, awaited one after another per
follower, so a slow callback delays only its own job's later callbacks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import redis
import redis.asyncio as aioredis

from pluginpool.policy.keys import RedisKeys
from pluginpool.policy.redis_text import as_text
from pluginpool.tasks.job_status import TERMINAL, decode_change, in_order
from pluginpool.tasks.job_watch import Follower, deliver

logger = logging.getLogger("pluginpool.async_job_watch")

AsyncStatusCallback = Callable[[dict[str, Any]], Awaitable[None]]
READ_WAIT_S = 1.0
"""Longest single read on the subscription (it ends early when anything arrives)."""


class AsyncJobWatcher:
    """Job status subscriptions of one asyncio client."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys) -> None:
        self._client = client
        self._keys = keys
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._followers: dict[str, list[Follower]] = {}
        self._confirmed: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def history(self, job_id: str) -> list[dict[str, Any]]:
        return in_order(await self._client.hgetall(self._keys.job_status(job_id)))  # type: ignore[misc]

    async def status(self, job_id: str) -> str | None:
        history = await self.history(job_id)
        return str(history[-1]["status"]) if history else None

    async def follow(self, job_id: str, callback: AsyncStatusCallback) -> None:
        """Await `callback(change)` for every change of the job, from the first, in order."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        task = asyncio.get_running_loop().create_task(self._drain(queue, callback))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await self._add(Follower(job_id, queue.put_nowait))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        for task in list(self._tasks):
            task.cancel()
        if self._pubsub is not None:
            await self._pubsub.aclose()
            self._pubsub = None

    # -- inside ---------------------------------------------------------------------------

    async def _drain(self, queue: asyncio.Queue[dict[str, Any]],
                     callback: AsyncStatusCallback) -> None:
        while True:
            change = await queue.get()
            try:
                await callback(change)
            except Exception:
                logger.exception("job status callback %r failed", callback)
            if change.get("status") in TERMINAL:
                return

    async def _add(self, follower: Follower) -> None:
        channel = self._keys.job_channel(follower.job_id)
        known = channel in self._followers
        self._followers.setdefault(channel, []).append(follower)
        if self._pubsub is None:
            self._pubsub = self._client.pubsub()
        if not known:
            await self._pubsub.subscribe(channel)
        elif channel in self._confirmed:
            await self._catch_up(channel, [follower])
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=READ_WAIT_S)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                logger.warning("job status subscription lost (%r); reconnecting", exc)
                self._confirmed.clear()  # redis-py subscribes again; confirmations catch up
                await asyncio.sleep(0.5)
                continue
            if message is not None:
                await self._on_message(message)

    async def _on_message(self, message: dict[str, Any]) -> None:
        channel = as_text(message["channel"])
        followers = list(self._followers.get(channel, []))
        if message["type"] == "subscribe":
            self._confirmed.add(channel)
            await self._catch_up(channel, followers)
        elif message["type"] == "message":
            change = decode_change(message["data"])
            history: list[dict[str, Any]] | None = None
            for follower in followers:
                seq = int(change.get("seq", 0))
                if seq > follower.last_seq + 1 and history is None:
                    history = await self.history(follower.job_id)
                deliver(follower, change, partial(list, history or [change]))
            await self._prune(channel)

    async def _catch_up(self, channel: str, followers: list[Follower]) -> None:
        if not followers:
            return
        history = await self.history(followers[0].job_id)
        for follower in followers:
            if history:
                deliver(follower, history[-1], partial(list, history))
        await self._prune(channel)

    async def _prune(self, channel: str) -> None:
        remaining = [f for f in self._followers.get(channel, []) if not f.done]
        if remaining:
            self._followers[channel] = remaining
            return
        self._followers.pop(channel, None)
        self._confirmed.discard(channel)
        await self._pubsub.unsubscribe(channel)
