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

logger = logging.getLogger("pluginpool.async_results")

Decode = Callable[[bytes], dict[str, Any]]
READ_WAIT_S = 1.0
RECHECK_S = 5.0
"""A waiter reads the stored result itself this often: a publish it missed (a reconnect, a
reader that stumbled) costs at most this long, never the whole timeout."""


class AsyncResultWaiter:
    """Futures of outcomes by result key, fed by one subscription and one reader task."""

    def __init__(self, client: aioredis.Redis, decode: Decode) -> None:
        self._client = client
        self._decode = decode
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}

    async def wait(self, key: str, timeout: float | None) -> dict[str, Any]:
        """The stored meta (status, result, ...) once it is final; TimeoutError after
        `timeout`."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        known = key in self._waiters
        self._waiters.setdefault(key, []).append(future)
        if self._pubsub is None:
            self._pubsub = self._client.pubsub()
        try:
            if not known:
                await self._pubsub.subscribe(key)
            if self._reader is None or self._reader.done():
                self._reader = asyncio.get_running_loop().create_task(self._read())
            return await self._until_settled(key, future, timeout)
        finally:
            waiting = [f for f in self._waiters.get(key, []) if f is not future]
            if waiting:
                self._waiters[key] = waiting
            elif self._waiters.pop(key, None) is not None and self._pubsub is not None:
                await self._pubsub.unsubscribe(key)

    async def _until_settled(self, key: str, future: asyncio.Future[dict[str, Any]],
                             timeout: float | None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            wait_s = RECHECK_S if deadline is None else min(RECHECK_S, deadline - loop.time())
            if wait_s <= 0:
                raise TimeoutError(f"no result for {key} within {timeout} s")
            try:
                return await asyncio.wait_for(asyncio.shield(future), wait_s)
            except TimeoutError:
                self._settle(key, await self._client.get(key))
                if future.done():
                    return future.result()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        if self._pubsub is not None:
            await self._pubsub.aclose()
            self._pubsub = None

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=READ_WAIT_S)
                if message is None:
                    continue
                key = _text(message["channel"])
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

    def _settle(self, key: str, raw: Any) -> None:
        if raw is None:
            return
        meta = self._decode(raw if isinstance(raw, bytes) else str(raw).encode())
        if meta.get("status") not in states.READY_STATES:
            return
        for future in self._waiters.get(key, []):
            if not future.done():
                future.set_result(meta)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
