"""One test session per Redis database.

Every session flushes its database once at its start (tests/conftest.py `redis_url`). Two
sessions given the same PLUGINPOOL_TEST_REDIS_DB (9 for everyone who leaves it unset)
flushed each other: the running one then failed wherever it happened to be when the other
started (an unknown plugin, a job with no outcome after 60 s, a count short by the runs
the flush took, an empty /health page), a different error each time, and more often the
longer it ran. So a session claims its database before flushing it, in the same
transaction: a second session on that database is refused at once and touches nothing.

The claim is a key in the database itself, so it holds for sessions on other hosts sharing
the Redis; it lapses unless renewed, so a killed session frees its database within
`CLAIM_TTL_S`.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid

import redis

CLAIM_KEY = "pluginpool-test:session"
CLAIM_TTL_S = 30.0
"""A holder renews every third of this; one that stops renewing (killed) frees the
database after it."""

_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def describe_this_session() -> str:
    """Who holds a database, as the refused session's message shows it (unique per run)."""
    return (f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}"
            f" [{uuid.uuid4().hex[:8]}]: {' '.join(sys.argv)[:200]}")


class DatabaseClaim:
    """A test session's hold on its Redis database, renewed by a daemon thread."""

    def __init__(self, client: redis.Redis, *, owner: str,
                 ttl_s: float = CLAIM_TTL_S) -> None:
        self._redis = client
        self.owner = owner
        self._ttl_ms = int(ttl_s * 1000)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def flush_and_claim(self) -> str | None:
        """Flush the database and claim it in one transaction, unless another session
        holds it: then return that session's description and leave everything as it is."""
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(CLAIM_KEY)  # type: ignore[no-untyped-call]
                    holder = pipe.get(CLAIM_KEY)
                    if holder is not None and _text(holder) != self.owner:
                        pipe.unwatch()
                        return _text(holder)
                    pipe.multi()
                    pipe.flushdb()
                    pipe.set(CLAIM_KEY, self.owner, px=self._ttl_ms)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue  # claimed or released meanwhile: look again
        self._thread = threading.Thread(target=self._keep, name="test-db-claim", daemon=True)
        self._thread.start()
        return None

    def renew(self) -> bool:
        """Extend the claim; False if another session holds the database."""
        return bool(self._redis.eval(_RENEW, 1, CLAIM_KEY, self.owner, self._ttl_ms))

    def release(self) -> None:
        """Stop renewing and free the database, if this session still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._redis.eval(_RELEASE, 1, CLAIM_KEY, self.owner)

    def _keep(self) -> None:
        while not self._stop.wait(self._ttl_ms / 3000):
            try:
                if not self.renew():
                    print(f"\n{CLAIM_KEY} was taken over: another session may flush this "
                          "session's database", file=sys.stderr)
            except redis.RedisError as exc:  # a blip: the claim outlives a few missed renewals
                print(f"\ncould not renew {CLAIM_KEY}: {exc}", file=sys.stderr)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
