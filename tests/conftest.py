"""Shared fixtures: a real Redis (dedicated, flushed database) and real prefork workers.

Workers are started as subprocesses in their own session and stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.pool.tools.redis_bootstrap import ensure_redis, with_db
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from tests.session_database import DatabaseClaim, describe_this_session

ROOT = Path(__file__).resolve().parent.parent
TEST_PLUGINS = ROOT / "tests" / "plugins"
EXAMPLES = ROOT / "examples"
TEST_DB_BASE = int(os.environ.get("PLUGINPOOL_TEST_REDIS_DB", "9"))
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
TEST_DB = TEST_DB_BASE + (int(XDIST_WORKER[2:]) if XDIST_WORKER.startswith("gw") else 0)
"""`make test` splits the suite over pytest-xdist workers (gw0, gw1, ...): each is a test
session of its own with its own database, PLUGINPOOL_TEST_REDIS_DB + its number, so their
flushes and claims (tests/session_database.py) never meet."""
CHAOS_SCALE = int(os.environ.get("PLUGINPOOL_CHAOS_SCALE", "1"))
"""How much harder the fault tests push: 1 in `make test`, 2 in `make chaos` (twice the
jobs, messages and kills)."""


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A dedicated database on a reachable Redis, flushed once per run. Fails if none.

    The run claims the database as it flushes it (tests/session_database.py): a second run
    on the same database stops at once instead of flushing this one's data mid-run."""
    reachable = ensure_redis(os.environ.get("PLUGINPOOL_REDIS_URL"),
                             run_dir=tmp_path_factory.mktemp("redis"))
    url = with_db(reachable.url, TEST_DB)
    client = redis.Redis.from_url(url)
    claim = DatabaseClaim(client, owner=describe_this_session())
    holder = claim.flush_and_claim()
    if holder is not None:
        client.close()
        pytest.exit(f"Redis database {TEST_DB} ({url}) is in use by another test "
                    f"run ({holder}); flushing it would break that run. Give this run a "
                    "database of its own: PLUGINPOOL_TEST_REDIS_DB=<n>.",
                    returncode=pytest.ExitCode.USAGE_ERROR)
    yield url
    _reap_all()  # retired workers still hold connections to the database
    claim.release()
    client.close()


def make_settings(redis_url: str, **overrides: object) -> Settings:
    overrides.setdefault("package_index_url", "none")  # environments: no network in tests
    return Settings(_env_file=None, redis_url=redis_url,  # type: ignore[call-arg]
                    plugin_paths=[str(TEST_PLUGINS), str(EXAMPLES)], **overrides)


@pytest.fixture
def settings(redis_url: str) -> Settings:
    """Settings with a key prefix of its own, so registry state never leaks between tests."""
    return make_settings(redis_url, key_prefix=f"pptest:{uuid.uuid4().hex[:8]}:")


@pytest.fixture
def client(settings: Settings) -> Iterator[PluginClient]:
    with PluginClient(settings) as plugin_client:
        yield plugin_client


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a subprocess (worker, CLI, aggregator) these settings:
    every field the test set, as PLUGINPOOL_* variables."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("PLUGINPOOL_")}
    for name in settings.model_fields_set:
        value = settings.model_dump(mode="json")[name]
        env[f"PLUGINPOOL_{name.upper()}"] = (value if isinstance(value, str)
                                             else json.dumps(value))
    return env


WorkerStarter = Callable[..., ManagedProcess]


def spawn_worker(client: PluginClient, log_dir: Path, *, plugins: str = "all",
                 concurrency: int = 2, name: str | None = None,
                 extra_env: dict[str, str] | None = None) -> ManagedProcess:
    """Start `pluginpool worker` and wait until it answers a ping; fail with its log if not."""
    nodename = name or f"test-{uuid.uuid4().hex[:6]}@localhost"
    proc = ManagedProcess(
        [sys.executable, "-m", "pluginpool.pool.tools.cli", "worker", "--plugins", plugins,
         "--concurrency", str(concurrency), "--name", nodename, "--loglevel", "INFO"],
        env={**worker_env(client.settings), **(extra_env or {})},
        log_path=log_dir / f"{nodename}.log",
    )
    proc.nodename = nodename  # type: ignore[attr-defined]
    ready = wait_until(
        lambda: not proc.alive() or bool(
            client.app.control.ping(destination=[nodename], timeout=0.25)),
        timeout_s=60)
    if not ready or not proc.alive():
        proc.stop()
        pytest.fail(f"worker {nodename} did not start:\n{proc.log_text()[-4000:]}")
    return proc


_retiring: list[ManagedProcess] = []


def retire(*procs: ManagedProcess) -> None:
    """End processes a test is done with without waiting for their shutdown: SIGTERM to
    each process group now, reaped (SIGKILL after the usual grace) by the end of the run.

    A worker's warm shutdown takes about 3 s (billiard's pool join, the listeners'
    threads), but it stops consuming within milliseconds of the signal, so the next
    module's worker can start beside it. For teardown only: a test that asserts on what a
    stop does (warm shutdown, requeues, sandboxes torn down) calls `stop()` and waits."""
    for proc in procs:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        _retiring.append(proc)
    for done in [proc for proc in _retiring if not proc.alive()]:
        done.stop()  # closes its log
        _retiring.remove(done)


@pytest.fixture(scope="session", autouse=True)
def _reap_retired() -> Iterator[None]:
    """Every retired process is gone (by PID) before the run ends."""
    yield
    _reap_all()


def _reap_all() -> None:
    while _retiring:
        _retiring.pop().stop()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[WorkerStarter]:
    """Start workers for one test; all are retired (stopped by PID) at the end."""
    started: list[ManagedProcess] = []

    def _start(client: PluginClient, **options: object) -> ManagedProcess:
        proc = spawn_worker(client, tmp_path, **options)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield _start
    retire(*started)


@pytest.fixture
def test_plugins(client: PluginClient) -> PluginClient:
    """The client with the test manifest registered."""
    client.register(TEST_PLUGINS / "test_plugins.toml")
    return client
