"""The producer's API for asyncio applications (FastAPI, aiohttp): `PluginClient`'s surface
as coroutines, on one event loop.

Waiting is where an async application needs it: awaiting a job costs no thread. An
awaited result is one subscription on the client's redis.asyncio pub/sub connection to the
result backend (`async_results.py`, the channel Celery's Redis backend publishes each
stored state on), resolved by the same code as the threaded client's (`Job.resolve`);
status callbacks follow the job's pushed statuses (`async_job_watch.py`).

Submitting reuses `PluginClient` whole (validation, spec cache, breaker, fallback, the
Celery publish) rather than a second implementation of each: it is a few short Redis round
trips, run on a small, bounded thread pool (`max_threads`), never one thread per job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from celery import states

from pluginpool.policy.errors import JobWaitTimeoutError, PluginPoolError
from pluginpool.policy.health import PluginHealth
from pluginpool.tasks.async_job_watch import AsyncJobWatcher, AsyncStatusCallback
from pluginpool.tasks.async_results import AsyncResultWaiter
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.instances import SandboxInfo
from pluginpool.tasks.jobs import FallbackJob, Job
from pluginpool.tasks.redis_conn import client_options
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec

T = TypeVar("T")
AsyncResultCallback = Callable[[Any], Awaitable[None]]
AsyncErrorCallback = Callable[[BaseException], Awaitable[None]]


class AsyncJob:
    """A submitted job, awaited: `await job.result(timeout)`, coroutine callbacks."""

    def __init__(self, job: Job | FallbackJob, client: AsyncPluginClient) -> None:
        self._job = job
        self._client = client
        self.id: str = job.id
        self.plugin_id = job.plugin_id
        self.instance_id = job.instance_id
        self.is_fallback = job.is_fallback

    def __repr__(self) -> str:
        return f"<AsyncJob {self.id} plugin={self.plugin_id}>"

    @property
    def meta(self) -> dict[str, Any]:
        return self._job.meta

    async def result(self, timeout: float | None = None) -> Any:
        """The plugin's value; raises what `Job.result` raises (JobWaitTimeoutError after
        `timeout`; the job goes on)."""
        if isinstance(self._job, FallbackJob):
            return self._job.result()
        try:
            return await self._client.outcome(self._job, timeout)
        except TimeoutError:
            raise JobWaitTimeoutError(self.id, timeout_s=timeout or 0.0) from None

    async def status(self) -> str | None:
        if isinstance(self._job, FallbackJob):
            return self._job.status()
        return await self._client.watcher.status(self.id)

    async def on_status_change(self, callback: AsyncStatusCallback) -> None:
        """Await `callback(change)` once per status change, in order, from the first."""
        if isinstance(self._job, FallbackJob):
            await callback({"job_id": self.id, "status": "succeeded", "seq": 1,
                            "plugin_id": self.plugin_id, "fallback": True})
            return
        await self._client.watcher.follow(self.id, callback)

    async def on_result(self, callback: AsyncResultCallback) -> None:
        """Await `callback(value)` once, when the job succeeded."""
        await self._on_final(on_result=callback)

    async def on_error(self, callback: AsyncErrorCallback) -> None:
        """Await `callback(error)` once, when the job failed."""
        await self._on_final(on_error=callback)

    async def _on_final(self, *, on_result: AsyncResultCallback | None = None,
                        on_error: AsyncErrorCallback | None = None) -> None:
        """One task awaiting the stored outcome (whoever stores it), then the callback."""
        async def wait_then_call() -> None:
            try:
                value = await self.result()
            except PluginPoolError as exc:
                if on_error is not None:
                    await on_error(exc)
                return
            if on_result is not None:
                await on_result(value)

        self._client.spawn(wait_then_call())


class AsyncPluginClient:
    """One asyncio producer's handle on pluginpool; use one per event loop."""

    def __init__(self, settings: Settings, *, sync_client: PluginClient | None = None,
                 max_threads: int = 4) -> None:
        self.settings = settings
        self.sync = sync_client or PluginClient(settings)
        """The threaded client whose validation, breaker and publish `submit` reuses."""
        self._executor = ThreadPoolExecutor(max_workers=max_threads,
                                            thread_name_prefix="pluginpool-async")
        options = client_options(settings)
        self.redis = aioredis.Redis.from_url(settings.redis_url, **options)
        self._results = aioredis.Redis.from_url(settings.effective_result_backend,
                                                **{**options, "decode_responses": False})
        self.watcher = AsyncJobWatcher(self.redis, settings.keys)
        self.results = AsyncResultWaiter(self._results, self.sync.app.backend.decode_result)
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_env(cls, **overrides: Any) -> AsyncPluginClient:
        return cls(Settings.from_env(**overrides))

    async def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(function, *args, **kwargs))

    # -- the same surface as PluginClient -------------------------------------------------

    async def register(self, source: str | Path | PluginSpec | Iterable[PluginSpec], *,
                       by: str | None = None) -> list[PluginSpec]:
        return await self._call(self.sync.register, source, by=by)

    async def plugins(self) -> list[PluginSpec]:
        return await self._call(self.sync.plugins)

    async def spec(self, plugin_id: str) -> PluginSpec:
        return await self._call(self.sync.spec, plugin_id)

    async def load(self, plugin_id: str, initial_data: dict[str, Any] | None = None) -> str:
        return await self._call(self.sync.load, plugin_id, initial_data)

    async def unload(self, instance_id: str) -> None:
        await self._call(self.sync.unload, instance_id)

    async def sandbox_info(self, instance_id: str) -> SandboxInfo:
        return await self._call(self.sync.sandbox_info, instance_id)

    async def health(self, plugin_id: str | None = None
                     ) -> PluginHealth | list[PluginHealth]:
        return await self._call(self.sync.health, plugin_id)

    async def submit(self, plugin_id: str, payload: Any = None, *,
                     instance_id: str | None = None, operation: str = "run") -> AsyncJob:
        """Enqueue one job; raises what `PluginClient.submit` raises, nothing enqueued then."""
        job = await self._call(self.sync.submit, plugin_id, payload, instance_id=instance_id,
                               operation=operation)
        return AsyncJob(job, self)

    async def result(self, job_id: str, *, timeout: float | None = None,
                     plugin_id: str | None = None) -> Any:
        """The value of a job by its id (submitted by anyone)."""
        return await self.job(job_id, plugin_id=plugin_id).result(timeout)

    async def execute(self, instance_id: str, payload: Any = None, *, operation: str = "run",
                      timeout: float | None = None) -> Any:
        """Run an operation on a loaded instance and await its value."""
        instance = await self._call(self.sync.instance, instance_id)
        job = await self.submit(instance.plugin_id, payload, instance_id=instance_id,
                                operation=operation)
        return await job.result(timeout)

    def job(self, job_id: str, *, plugin_id: str | None = None) -> AsyncJob:
        """A handle on an earlier job by its id."""
        return AsyncJob(self.sync.job(job_id, plugin_id=plugin_id), self)

    async def outcome(self, job: Job | FallbackJob, timeout: float | None = None) -> Any:
        """Await the job's stored outcome and resolve it like `Job.result` (value, or its
        error raised); TimeoutError after `timeout`."""
        if isinstance(job, FallbackJob):
            return job.result()
        backend: Any = job.async_result.backend  # a key-value backend (Redis)
        key = backend.get_key_for_task(job.id)
        meta = await self.results.wait(key.decode() if isinstance(key, bytes) else key, timeout)
        return job.resolve(meta.get("result"), failed=meta["status"] in states.PROPAGATE_STATES)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a callback's task on the loop, kept referenced until it ends."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.results.close()
        await self.watcher.close()
        await self.redis.aclose()
        await self._results.aclose()
        self._executor.shutdown(wait=False)
        self.sync.close()

    async def __aenter__(self) -> AsyncPluginClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
