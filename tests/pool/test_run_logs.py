"""Every run's logs: stdout, stderr and ctx.logger of a sandboxed run, captured through the
supervisor, capped, and kept where operators look (job meta, error details, recent runs,
sandbox_info, the worker's log)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import psutil
import pytest

from pluginpool.policy.errors import PluginExecutionError
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.runs import RecentRuns
from tests.conftest import TEST_PLUGINS, make_settings, retire, spawn_worker

CAP = 32_768


@pytest.fixture(scope="module")
def env(redis_url: str, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[PluginClient, ManagedProcess]]:
    settings = make_settings(redis_url, key_prefix=f"pplogs:{uuid.uuid4().hex[:8]}:",
                             max_log_bytes=CAP)
    client = PluginClient(settings)
    client.register(TEST_PLUGINS / "ops_plugins.toml")
    worker = spawn_worker(client, tmp_path_factory.mktemp("logs"),
                          plugins="ops-talks,ops-floods,ops-talks-trusted,ops-writes-fds,"
                                  "ops-setup-writes-fd", concurrency=1)
    yield client, worker
    retire(worker)
    client.close()


def expected(tag: str, plugin: str = "ops-talks") -> list[str]:
    return [f"stdout: to stdout {tag}", f"stderr: to stderr {tag}",
            f"log: WARNING pluginpool.plugin.{plugin}: to the logger {tag}"]


def test_an_in_process_runs_logs_are_kept_the_same_way(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, _ = env
    job = client.submit("ops-talks-trusted", {"tag": "trusted"})
    assert job.result(timeout=30) == "said it"
    assert job.meta["logs"].splitlines() == expected("trusted", "ops-talks-trusted")
    failed = client.submit("ops-talks-trusted", {"tag": "trusted-bad", "fail": True})
    with pytest.raises(PluginExecutionError) as caught:
        failed.result(timeout=30)
    assert caught.value.details["logs"].splitlines() == expected("trusted-bad",
                                                                 "ops-talks-trusted")


def test_stdout_stderr_and_logger_come_back_in_meta_and_are_kept(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, worker = env
    instance = client.load("ops-talks")
    job = client.submit("ops-talks", {"tag": "ok-1"}, instance_id=instance)
    assert job.result(timeout=30) == "said it"
    assert job.meta["logs"].splitlines() == expected("ok-1")
    run = RecentRuns(client.redis, client.settings.keys).read("ops-talks")[0]
    assert run["job_id"] == job.id and run["ok"] and run["logs"] == job.meta["logs"]
    last = client.sandbox_info(instance).last_run
    assert last is not None and last["logs"] == job.meta["logs"]
    # The pool child stores the result before the worker's main process logs the success.
    assert wait_until(lambda: f"plugin.ops-talks[{job.id}] succeeded in" in worker.log_text(),
                      timeout_s=30)
    log = worker.log_text()
    assert f"[ops-talks {job.id}] stdout: to stdout ok-1" in log
    assert "said it" not in log and "(value not logged)" in log  # a success, not its value


def test_a_failed_runs_logs_are_in_its_error_and_the_plugins_recent_errors(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, _ = env
    job = client.submit("ops-talks", {"tag": "bad-1", "fail": True})
    with pytest.raises(PluginExecutionError) as caught:
        job.result(timeout=30)
    assert caught.value.details["logs"].splitlines() == expected("bad-1")
    assert "failed on purpose bad-1" in caught.value.details["traceback"]
    recent = json.loads(client.redis.lindex(
        client.settings.keys.recent_errors("ops-talks"), 0))
    assert recent["job_id"] == job.id and "to stderr bad-1" in recent["details"]["logs"]
    health = client.health("ops-talks")
    assert "logs" not in health.last_errors[0]["details"]  # type: ignore[union-attr]


def test_a_run_printing_100_mb_keeps_the_worker_and_redis_within_the_cap(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, worker = env
    redis_before = int(client.redis.info("memory")["used_memory"])
    job = client.submit("ops-floods", {"mb": 100})
    assert job.result(timeout=120) == "flooded"
    logs = job.meta["logs"]
    assert logs.startswith("[... ") and "bytes of earlier output dropped" in logs
    assert len(logs.encode()) <= CAP * 1.2  # the kept bytes plus one prefix per line
    dropped = int(logs.split()[1])
    assert dropped >= 100 * 1024 * 1024 - CAP
    assert int(client.redis.info("memory")["used_memory"]) - redis_before < 5 * 1024 * 1024
    tree = psutil.Process(worker.pid)
    rss_mb = max(p.memory_info().rss for p in [tree, *tree.children(recursive=True)]) / 2**20
    assert rss_mb < 250, rss_mb  # no process held the 100 MB


def test_output_written_straight_to_descriptors_1_and_2_is_kept_too(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    """What a run writes to fds 1 and 2 directly (C code, a process it starts) and what a
    setup writes there reach the logs like print's output, each under its stream."""
    client, worker = env
    job = client.submit("ops-writes-fds", {"tag": "a", "child": True})
    assert job.result(timeout=30) == "wrote"
    lines = set(job.meta["logs"].splitlines())
    assert {"stdout: fd 1 a", "stderr: fd 2 a", "stdout: child a",
            "stderr: child error a"} <= lines
    # The next run's logs hold its own output only.
    again = client.submit("ops-writes-fds", {"tag": "b"})
    assert again.result(timeout=30) == "wrote"
    assert again.meta["logs"].splitlines() == ["stdout: fd 1 b", "stderr: fd 2 b"] or \
        sorted(again.meta["logs"].splitlines()) == ["stderr: fd 2 b", "stdout: fd 1 b"]
    failed = client.submit("ops-writes-fds", {"tag": "c", "fail": True})
    with pytest.raises(PluginExecutionError) as caught:
        failed.result(timeout=30)
    assert "stdout: fd 1 c" in caught.value.details["logs"]
    set_up = client.submit("ops-setup-writes-fd", {"tag": "d"})
    assert set_up.result(timeout=30) == "wrote"
    assert "stderr: setup wrote to fd 2" in set_up.meta["logs"]
    assert "stdout: fd 1 d" in set_up.meta["logs"]
    later = client.submit("ops-setup-writes-fd", {"tag": "e"})
    assert later.result(timeout=30) == "wrote" and "setup" not in later.meta["logs"]
    assert worker.alive()


def test_output_left_in_stdio_buffers_is_flushed_before_the_result(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, _ = env
    job = client.submit("ops-writes-fds", {"tag": "f", "buffered": True})
    assert job.result(timeout=30) == "wrote"
    lines = job.meta["logs"].splitlines()
    assert "stdout: buffered python f" in lines and "stdout: buffered c f" in lines
    # One write larger than the pipe, on a descriptor the plugin made non-blocking: whole.
    big = client.submit("ops-writes-fds", {"tag": "g", "nonblocking_big": True})
    assert big.result(timeout=30) == "wrote"
    assert "stdout: end of the big write g" in big.meta["logs"].splitlines()


def test_a_run_flooding_descriptor_1_is_kept_within_the_cap(
        env: tuple[PluginClient, ManagedProcess]) -> None:
    client, _ = env
    job = client.submit("ops-writes-fds", {"tag": "flood", "mb": 20})
    assert job.result(timeout=120) == "wrote"
    logs = job.meta["logs"]
    assert "bytes of earlier output dropped" in logs
    assert len(logs.encode()) <= CAP * 1.2
