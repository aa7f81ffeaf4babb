"""Awaiting stored outcomes on an event loop, the way Celery's own Redis result consumer
waits: the backend publishes every state it stores on a channel named like the result's
key, so a waiter subscribes to it, then reads the key once (it may be stored already).

This is what `AsyncJob.result` awaits, rather than the job's pushed status: an outcome
stored by anyone (the worker, an operator's cancel or purge, an unregister failing the
queued jobs) ends the wait, whoever wrote it. One pub/sub connection per client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aioredis
from celery import states

from pluginpool.policy.redis_text import as_text

logger = logging.getLogger("pluginpool.async_results")

Decode = Callable[[bytes], dict[str, Any]]
READ_WAIT_S = 1.0
IDLE_POLL_S = 0.05
"""How often an idle reader (no job awaited) looks for a new subscription."""
RECHECK_S = 5.0
"""The reader reads every awaited result itself this often: a publish it missed (a
reconnect, a reader that stumbled) costs at most this long, never the whole timeout."""
RECHECK_BATCH = 500


class AsyncResultWaiter:
    """Futures of outcomes by result key, fed by one subscription and one reader task."""

    def __init__(self, client: aioredis.Redis, decode: Decode) -> None:
        self._client = client
        self._decode = decode
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._closed = False
        self._subscribing = asyncio.Lock()
        """Serializes (un)subscribes: redis-py's asyncio PubSub takes a pool connection
        for every command issued before its first connect completes, so a thousand waits
        begun at once took a thousand (MaxConnectionsError past the pool's 100)."""

    async def wait(self, key: str, timeout: float | None) -> dict[str, Any]:
        """The stored meta (status, result, ...) once it is final; TimeoutError after
        `timeout`."""
        if self._closed:
            raise RuntimeError("this client is closed")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        known = key in self._waiters
        self._waiters.setdefault(key, []).append(future)
        if self._pubsub is None:
            self._pubsub = self._client.pubsub()
        pubsub = self._pubsub
        try:
            if not known:
                async with self._subscribing:
                    await pubsub.subscribe(key)
            if not self._closed and (self._reader is None or self._reader.done()):
                self._reader = asyncio.get_running_loop().create_task(self._read(pubsub))
            return await asyncio.wait_for(future, timeout)
        finally:
            waiting = [f for f in self._waiters.get(key, []) if f is not future]
            if waiting:
                self._waiters[key] = waiting
            elif (self._waiters.pop(key, None) is not None and not self._closed
                  and self._pubsub is pubsub):
                async with self._subscribing:
                    await pubsub.unsubscribe(key)

    async def _recheck(self) -> None:
        """Read every awaited result once, in batches: what a missed publish left waiting
        settles within RECHECK_S, with one round trip per batch, not one per waiter."""
        keys = list(self._waiters)
        for start in range(0, len(keys), RECHECK_BATCH):
            batch = keys[start:start + RECHECK_BATCH]
            for key, raw in zip(batch, await self._client.mget(batch), strict=True):
                self._settle(key, raw)

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        if self._pubsub is not None:
            await self._pubsub.aclose()
            self._pubsub = None

    async def _read(self, pubsub: Any) -> None:
        """Reads `pubsub` until the waiter is closed (or given another subscription)."""
        loop = asyncio.get_running_loop()
        recheck_at = loop.time() + RECHECK_S
        while not self._closed and self._pubsub is pubsub:
            try:
                if loop.time() >= recheck_at:
                    recheck_at = loop.time() + RECHECK_S
                    await self._recheck()
                if not pubsub.subscribed:
                    # Every waiter is done: redis-py refuses to read a pubsub with no
                    # subscription ("connection not set"); wait for the next one.
                    await asyncio.sleep(IDLE_POLL_S)
                    continue
                message = await pubsub.get_message(timeout=READ_WAIT_S)
                if message is None:
                    continue
                key = as_text(message["channel"])
                if message["type"] == "subscribe":  # stored before we listened?
                    self._settle(key, await self._client.get(key))
                elif message["type"] == "message":
                    self._settle(key, message["data"])
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                logger.warning("result subscription lost (%r); reconnecting", exc)
                await asyncio.sleep(0.5)  # redis-py subscribes again; each confirmation reads
            except asyncio.CancelledError:
                raise
            except Exception:  # one odd message must not stop every waiter's reader
                logger.exception("could not handle a result message; waiters re-read")
                await asyncio.sleep(IDLE_POLL_S)

    def _settle(self, key: str, raw: Any) -> None:
        if raw is None:
            return
        meta = self._decode(raw if isinstance(raw, bytes) else str(raw).encode())
        if meta.get("status") not in states.READY_STATES:
            return
        for future in self._waiters.get(key, []):
            if not future.done():
                future.set_result(meta)
