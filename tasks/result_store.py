"""Celery's Redis result backend, with a plugin job's end written in the same MULTI as its
result: the final status (`succeeded`, `failed`, `cancelled`, recorded and pushed by
`job_status_lib.lua`'s `write_status`) and the bookkeeping the task left for it
(pool/recording.py: the outcome record, i.e. breaker window, health figures, usage and error
events; the instance's usage; the run log).

Why here: Celery stores every result with a GET (is a SUCCESS stored already?) and one
MULTI (SETEX + PUBLISH) anyway, so what is written with it costs no round trip of its own
(issue 16). For a plugin job's end the GET goes too: one script in that MULTI
(`store_result.lua`) checks for a stored SUCCESS, stores and publishes the result and
writes the final status, so a watcher that sees `succeeded` or `failed` can read the
outcome at once, and the check and the store have no gap between them.
Only when the result backend is pluginpool's own Redis database (`same_database`), and only
in a worker (`bind_result_store`); otherwise the signal hooks write statuses as before
(pool/job_status_hooks.py) and the task writes its run log itself.

If a worker dies after the run and before this write, nothing of that run is recorded (it
is all one transaction) and the job is redelivered and run again (acks late): it is then
recorded once, with that run's result. A run whose job already has a stored success (a
redelivery after the store, before the ack) is recorded without a second result.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from billiard.exceptions import WorkerLostError
from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError, TimeLimitExceeded
from kombu.utils.encoding import bytes_to_str
from redis.exceptions import NoScriptError

from pluginpool.policy.errors import PluginExecutionError
from pluginpool.policy.keys import RedisKeys
from pluginpool.tasks.job_status import LIB_SOURCE, encode_change
from pluginpool.tasks.routing import plugin_of_task

logger = logging.getLogger("pluginpool.job_status")

STORE_SOURCE = LIB_SOURCE + Path(__file__).with_name("store_result.lua").read_text()
"""A plugin job's result and final status, stored unless it has a stored success."""
STORE_SHA = hashlib.sha1(STORE_SOURCE.encode()).hexdigest()
BACKEND_PATH = f"{__name__}:JobResultBackend"

PipeWrite = Callable[[Any], None]
"""Queues commands on a pipeline (the MULTI that stores a job's result)."""
Replies = Callable[[list[Any]], None]
"""Given the replies of the commands a `PipeWrite` queued (errors as exceptions)."""


@dataclass(frozen=True)
class ResultWrite:
    """Bookkeeping a task leaves for the MULTI that stores its result."""

    queue: PipeWrite
    done: Replies | None = None


def backend_url(url: str) -> str:
    """The result backend URL Celery is given: this backend for redis:// and rediss://
    (Celery's `module:Class+url` form), any other URL unchanged."""
    if url.startswith(("redis://", "rediss://")):
        return f"{BACKEND_PATH}+{url}"
    return url


def same_database(a: str, b: str) -> bool:
    """Two Redis URLs naming one database of one server."""
    ua, ub = urlsplit(a), urlsplit(b)
    return (ua.scheme, ua.hostname, ua.port, _db(ua.path, ua.query)) == \
        (ub.scheme, ub.hostname, ub.port, _db(ub.path, ub.query))


def _db(path: str, query: str) -> int:
    number = path.strip("/") or parse_qs(query).get("db", ["0"])[0]
    return int(number) if number.isdigit() else 0


def writes_final_statuses(backend: Any) -> bool:
    """True when `backend` writes plugin jobs' final statuses with their results."""
    return isinstance(backend, JobResultBackend) and backend.statuses is not None


def bind_result_store(backend: Any, keys: RedisKeys, *, ttl_s: int, result_backend: str,
                      redis_url: str) -> bool:
    """Let the worker's backend write final statuses and run logs with results, if it is
    this backend on pluginpool's Redis database. Returns whether it does."""
    if not isinstance(backend, JobResultBackend) or not same_database(result_backend,
                                                                      redis_url):
        return False
    backend.statuses = _Statuses(keys, ttl_s)
    return True


def final_status(state: str, result: Any) -> tuple[str, dict[str, Any]] | None:
    """The status a stored state ends a job with, and its fields; None: not an end."""
    if state == states.SUCCESS:
        return "succeeded", {}
    if state != states.FAILURE:
        return None
    name = type(result).__name__
    if name == "JobCancelledError":
        return "cancelled", {}
    if isinstance(result, PluginExecutionError):
        return "failed", {"error_type": str(result.type), "error": name}
    if isinstance(result, TimeLimitExceeded):
        return "failed", {"error_type": "timeout", "error": name}
    if isinstance(result, WorkerLostError):
        return "failed", {"error_type": "runtime", "error": name}
    return "failed", {"error_type": None, "error": name}


@dataclass(frozen=True)
class _Statuses:
    keys: RedisKeys
    ttl_s: int


@dataclass
class _End:
    """What the MULTI storing one job's result carries besides it."""

    job_id: str
    status: tuple[str, str]  # (status, change JSON)
    writes: list[ResultWrite] = field(default_factory=list)
    written: bool = False


class JobResultBackend(RedisBackend):  # type: ignore[misc]
    """Celery's RedisBackend; see the module docstring."""

    statuses: _Statuses | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ending = threading.local()
        self._pending: dict[str, list[ResultWrite]] = {}
        self._lock = threading.Lock()

    def with_result(self, job_id: str, write: PipeWrite, done: Replies | None = None) -> bool:
        """Have `write` queued on the MULTI that stores the job's result, and `done` given
        its replies. False (and nothing kept) when this backend is not bound: the caller
        writes it itself."""
        if self.statuses is None:
            return False
        with self._lock:
            self._pending.setdefault(job_id, []).append(ResultWrite(write, done))
        return True

    def store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None,
                     request: Any = None, **kwargs: Any) -> Any:
        """Celery's store, with what the job's end writes (decided from the raw result,
        before Celery encodes an exception) queued on its MULTI."""
        job_id = str(task_id)
        end = self._end_of(job_id, state, result, request)
        if end is None:
            return super().store_result(task_id, result, state, traceback=traceback,
                                        request=request, **kwargs)
        self._ending.end = end
        try:
            return super().store_result(task_id, result, state, traceback=traceback,
                                        request=request, **kwargs)
        finally:
            self._ending.end = None
            if end.writes and not end.written:
                # Its MULTI never ran (a value too large, Redis failing): the run's
                # bookkeeping is written anyway. A stored success is checked in the MULTI.
                self._write_alone(end.writes)

    def _end_of(self, job_id: str, state: str, result: Any, request: Any) -> _End | None:
        statuses = self.statuses
        if statuses is None:
            return None
        plugin_id = plugin_of_task(str(getattr(request, "task", None) or ""))
        ending = final_status(state, result) if plugin_id is not None else None
        with self._lock:
            writes = self._pending.pop(job_id, []) if ending is not None else []
        if ending is None:
            return None
        status, fields = ending
        return _End(job_id, (status, encode_change(job_id, plugin_id=plugin_id, **fields)),
                    writes)

    def _store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None,
                      request: Any = None, **kwargs: Any) -> Any:
        """Celery's, without its GET of the stored state first: for a job's end, the store
        script itself refuses to overwrite a stored SUCCESS (one round trip less per job)."""
        if getattr(self._ending, "end", None) is None:
            return super()._store_result(  # type: ignore[misc]
                task_id, result, state, traceback=traceback, request=request, **kwargs)
        meta = self._get_result_meta(  # type: ignore[attr-defined]
            result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        try:
            self._set_with_state(  # type: ignore[attr-defined]
                self.get_key_for_task(task_id), self.encode(meta), state)
        except BackendStoreError as exc:
            raise BackendStoreError(  # Celery takes them as keywords; its stubs do not say
                str(exc), state=state, task_id=task_id) from exc  # type: ignore[call-arg]
        return result

    def _set(self, key: str, value: Any, expires: int | None = None) -> None:
        end: _End | None = getattr(self._ending, "end", None)
        statuses = self.statuses
        if end is None or statuses is None:
            super()._set(key, value, expires)  # type: ignore[misc]
            return
        if expires is None:
            expires = self.expires  # type: ignore[attr-defined]
        store = (3, key, statuses.keys.job_status(end.job_id),
                 statuses.keys.job_channel(end.job_id), value, int(expires or 0),
                 *end.status, statuses.ttl_s)
        with self.client.pipeline() as pipe:
            spans = []
            for write in end.writes:
                start = len(pipe.command_stack)
                write.queue(pipe)
                spans.append((write, start, len(pipe.command_stack)))
            # Last: what the bookkeeping publishes (a breaker transition) goes out before the
            # status a producer waits on, so a producer that saw `failed` has, on its other
            # subscription, usually seen the breaker open too.
            pipe.execute_command("EVALSHA", STORE_SHA, *store)
            replies = pipe.execute(raise_on_error=False)
        end.written = True
        store_lost = isinstance(replies[-1], NoScriptError)  # a Redis restarted since
        if not store_lost and isinstance(replies[-1], Exception):
            raise replies[-1]
        for write, start, stop in spans:  # a write whose script was lost is written again
            _done(write, replies[start:stop], end.job_id)
        if store_lost:  # after those: a producer that sees the result sees them too
            self.client.eval(STORE_SOURCE, *store)

    def _write_alone(self, writes: list[ResultWrite]) -> None:
        for write in writes:
            try:
                with self.client.pipeline(transaction=False) as pipe:
                    write.queue(pipe)
                    replies = pipe.execute(raise_on_error=False)
            except redis.RedisError as exc:
                replies = [exc]
            _done(write, replies, "")


def _done(write: ResultWrite, replies: list[Any], job_id: str) -> None:
    if write.done is not None:
        try:
            write.done(replies)
        except Exception:  # the result is stored; a callback must not undo that
            logger.exception("bookkeeping of job %s failed after its result was stored",
                             job_id)
        return
    for reply in replies:
        if isinstance(reply, Exception):
            logger.warning("could not record the run of job %s: %s", job_id, reply)
