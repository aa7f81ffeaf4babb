"""A second test run on a database this run holds is refused and flushes nothing (two runs
sharing PLUGINPOOL_TEST_REDIS_DB flushed each other's registry, queues and figures)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import redis

from tests.conftest import ROOT, TEST_DB
from tests.session_database import CLAIM_KEY, CLAIM_TTL_S, DatabaseClaim


def test_a_second_run_is_refused_and_flushes_nothing(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    marker = f"pptest-claim:{uuid.uuid4().hex[:8]}"
    client.set(marker, "kept", ex=60)
    holder = client.get(CLAIM_KEY)
    assert holder is not None and 0 < client.pttl(CLAIM_KEY) <= CLAIM_TTL_S * 1000

    other = DatabaseClaim(client, owner="another run")
    assert other.flush_and_claim() == holder
    assert not other.renew()
    other.release()  # not its claim: nothing happens
    assert client.get(marker) == "kept" and client.get(CLAIM_KEY) == holder
    client.close()


def test_a_second_pytest_on_the_same_database_stops_at_once(redis_url: str) -> None:
    """The whole way a person meets it: pytest exits with a usage error naming the run that
    holds the database, and this run's data is still there."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    marker = f"pptest-claim:{uuid.uuid4().hex[:8]}"
    client.set(marker, "kept", ex=60)
    env = {**{k: v for k, v in os.environ.items()
              if not k.startswith(("PLUGINPOOL_", "PYTEST_XDIST"))},
           "PLUGINPOOL_TEST_REDIS_DB": str(TEST_DB),
           "PLUGINPOOL_REDIS_URL": redis_url.rsplit("/", 1)[0]}
    second = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/policy/test_storage_unload.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == 4, second.stdout[-2000:]
    assert f"Redis database {TEST_DB}" in second.stdout + second.stderr
    assert "in use by another test run" in second.stdout + second.stderr
    assert client.get(marker) == "kept"
    client.close()

