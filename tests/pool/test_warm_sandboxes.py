"""Warm sandboxes in a real prefork worker: class plugins set up once per sandbox, each
run a fresh fork of it, operations by name, teardown on unload; and setups that misbehave,
each typed, the worker alive, the next run clean. One worker serves the whole module."""

from __future__ import annotations

import contextlib
import json
import operator
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from pluginpool.policy.errors import (
    CircuitOpenError,
    ErrorType,
    PluginExecutionError,
    UnknownOperationError,
)
from pluginpool.pool.sandbox import owners
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec
from tests.conftest import TEST_PLUGINS, make_settings, spawn_worker

Env = tuple[PluginClient, ManagedProcess, Path]
OPERATIONS = ["run", "summarize", "allocate", "open_files", "sleep", "kill_zygote"]


def spec(plugin_id: str, entrypoint: str, **fields: Any) -> PluginSpec:
    return PluginSpec.model_validate({"id": plugin_id, "name": plugin_id,
                                      "entrypoint": f"pp_testplugins.{entrypoint}", **fields})


@pytest.fixture(scope="module")
def env(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    warm_root = tmp_path_factory.mktemp("warm")
    settings = make_settings(redis_url, key_prefix=f"ppwarm:{uuid.uuid4().hex[:8]}:",
                             warm_root=str(warm_root),
                             default_breaker={"minimum_calls": 10_000, "open_at_once_types": []},
                             default_isolation={"max_restarts": 0})
    client = PluginClient(settings)
    client.register([
        spec("good", "basic:echo"),
        spec("stateful", "lifecycle:Stateful", operations=OPERATIONS,
             resource_limits={"max_memory_mb": 128}),
        spec("setup-raises", "hostile_setup:Raises",
             breaker={"minimum_calls": 2, "window_size": 2, "failure_rate_threshold": 0.5,
                      "open_ms": 60_000}),
        spec("setup-hangs", "hostile_setup:Hangs", resource_limits={"setup_timeout_ms": 1000}),
        spec("setup-hangs-long", "hostile_setup:Hangs",
             resource_limits={"setup_timeout_ms": 120_000}),
        spec("setup-talks-long", "hostile_setup:TalksUntilStopped",
             resource_limits={"setup_timeout_ms": 120_000}),
        spec("setup-undoes-the-watch", "hostile_setup:UndoesTheWatch",
             resource_limits={"setup_timeout_ms": 120_000}),
        spec("setup-spins-throttled", "hostile_setup:Spins",
             resource_limits={"setup_timeout_ms": 120_000, "max_cpu_percent": 10}),
        spec("setup-allocates", "hostile_setup:Allocates",
             resource_limits={"max_memory_mb": 64, "setup_timeout_ms": 20_000}),
        spec("setup-thread", "hostile_setup:StartsThread"),
        spec("setup-thread-at-gc", "hostile_setup:StartsThreadAtCollection"),
        spec("setup-forbidden", "hostile_setup:Forbidden"),
        spec("setup-breaks-pipes", "hostile_setup:BreaksThePipes"),
        spec("setup-hoards-fds", "hostile_setup:HoardsDescriptors"),
        spec("setup-forks-then-dies", "hostile_setup:ForksThenDies"),
        spec("daemonizes", "hostile:daemonize_then_wait",
             permissions={"allow_processes": True}, resource_limits={"timeout_ms": 90_000}),
        spec("traces", "workspace:leave_traces"),
        spec("chatty", "lifecycle:Chatty"),
        spec("huge-setup-print", "lifecycle:PrintsHugeSetup"),
        spec("loud-teardown", "lifecycle:LoudTeardown"),
        spec("forges-pid", "protocol:ForgesRunPid"),
        spec("ghost-op", "lifecycle:Stateful", operations=["run", "ghost"]),
        spec("function-ops", "basic:echo", operations=["run", "other"]),
        spec("throttled-storage", "throttle:throttled_storage",
             resource_limits={"max_cpu_percent": 10, "timeout_ms": 30_000}),
        spec("unprintable", "unruly_errors:raises_unprintable"),
        spec("huge-message", "unruly_errors:raises_huge_message"),
        spec("setup-unprintable", "unruly_errors:SetupUnprintable"),
        spec("setup-huge-message", "unruly_errors:SetupHugeMessage"),
        spec("raising-property", "unruly_errors:RaisingProperty", operations=["run", "boom"]),
        spec("raising-property-in-pool", "unruly_errors:RaisingProperty",
             operations=["run", "boom"], isolation={"sandboxed": False}),
        spec("interrupts-in-pool", "unruly_errors:raises_keyboard_interrupt",
             isolation={"sandboxed": False}),
        spec("writes-after", "unruly_errors:writes_after"),
        spec("writes-after-in-pool", "unruly_errors:writes_after",
             isolation={"sandboxed": False}),
        spec("logs-levels", "unruly_errors:logs_at_every_level"),
        spec("logs-levels-in-pool", "unruly_errors:logs_at_every_level",
             isolation={"sandboxed": False}),
        spec("ghost-op-default-breaker", "lifecycle:Stateful", operations=["run", "ghost"],
             breaker={"open_at_once_types": ["security", "dependency"]}),
        spec("breaks-channel", "protocol:BreaksTheChannel",
             operations=["run", "mistyped", "half_frame", "storage_flood"],
             resource_limits={"timeout_ms": 1000, "setup_timeout_ms": 20_000}),
    ])
    worker = spawn_worker(client, tmp_path_factory.mktemp("warm-worker"), concurrency=1)
    yield client, worker, warm_root
    worker.stop()
    client.close()


def assert_unharmed(env: Env) -> None:
    client, worker, _ = env
    assert worker.alive()
    assert client.submit("good", {"after": True}).result(timeout=30)["payload"] == {"after": True}


def failure(env: Env, plugin: str, *, instance_id: str | None = None,
            operation: str = "run", payload: Any = None) -> PluginExecutionError:
    with pytest.raises(PluginExecutionError) as info:
        env[0].submit(plugin, payload or {}, instance_id=instance_id,
                      operation=operation).result(timeout=60)
    return info.value


def storage(client: PluginClient, instance_id: str, key: str) -> Any:
    raw = client.redis.hget(client.settings.keys.storage(instance_id), key)
    return None if raw is None else int(raw)


def test_setup_once_each_run_a_fresh_fork_that_sees_the_setup_state(env: Env) -> None:
    client = env[0]
    iid = client.load("stateful", {"items": ["a"]})
    runs = [client.execute(iid, {"add": f"x{n}"}, timeout=60) for n in range(4)]
    assert [run["items"] for run in runs] == [["a", f"x{n}"] for n in range(4)]
    assert {run["setups"] for run in runs} == {1}
    assert storage(client, iid, "setups") == 1
    assert len({run["pid"] for run in runs}) == 4
    assert {run["zygote"] for run in runs} == {runs[0]["parent"]}
    assert runs[0]["zygote"] not in {run["pid"] for run in runs}
    client.unload(iid)


def test_operations_are_dispatched_by_name_and_unknown_ones_refused_at_submit(
        env: Env) -> None:
    client = env[0]
    iid = client.load("stateful", {"items": ["a", "b"]})
    job = client.submit("stateful", {}, instance_id=iid, operation="summarize")
    assert job.result(timeout=60) == {"count": 2, "job_id": job.id}
    assert job.meta["operation"] == "summarize"
    queue_before = client.redis.llen("plugins.stateful")
    with pytest.raises(UnknownOperationError) as info:
        client.execute(iid, {}, operation="delete_everything")
    assert info.value.operations == OPERATIONS
    with pytest.raises(UnknownOperationError):
        client.submit("good", {}, operation="summarize")
    assert client.redis.llen("plugins.stateful") == queue_before
    plain = client.app.send_task("plugin.stateful", queue="plugins.stateful", kwargs={
        "payload": {}, "instance_id": iid, "operation": "summarize"})
    assert plain.get(timeout=60)["value"]["count"] == 2
    client.unload(iid)


def test_unload_runs_the_teardown_and_retires_the_sandbox(env: Env) -> None:
    client = env[0]
    iid = client.load("stateful", {})
    zygote = client.execute(iid, {"add": 1}, timeout=60)["zygote"]
    assert wait_until(lambda: bool(client.sandbox_info(iid).warm_sandboxes), timeout_s=10)
    info = client.sandbox_info(iid).warm_sandboxes[0]
    assert info.pid == zygote and info.runs >= 1 and info.setup_ms > 0 and info.rss_mb > 0
    assert info.guardian_pid == psutil.Process(zygote).ppid()  # its guardian, not the
    assert info.guardian_pid not in (None, 1, info.pool_pid)  # pool process nor PID 1
    client.unload(iid)
    retired = f"(pid {zygote}) retired (instance unloaded); teardown ran"
    assert wait_until(lambda: retired in env[1].log_text(), timeout_s=15)
    assert wait_until(lambda: not psutil.pid_exists(zygote), timeout_s=10)
    assert_unharmed(env)


def test_usage_counts_the_run_alone(env: Env) -> None:
    client = env[0]
    iid = client.load("stateful", {})
    quick = client.submit("stateful", {"add": 1}, instance_id=iid)
    quick.result(timeout=60)
    assert quick.meta["usage"]["cpu_ms"] < 2  # the fork and lock-down (ms) are not counted
    big = client.submit("stateful", {"mb": 40}, instance_id=iid, operation="allocate")
    big.result(timeout=60)
    assert big.meta["usage"]["cpu_percent"] <= 110  # one thread
    assert big.meta["usage"]["peak_memory_mb"] >= 35  # a short run still reports its peak
    client.unload(iid)


def test_hitting_the_open_files_limit_is_a_resource_error(env: Env) -> None:
    iid = env[0].load("stateful", {})
    error = failure(env, "stateful", instance_id=iid, operation="open_files",
                    payload={"n": 200})
    assert error.type is ErrorType.RESOURCE
    assert error.details["limit"] == "max_open_files"
    env[0].unload(iid)
    assert_unharmed(env)


def test_a_run_cannot_kill_its_zygote(env: Env) -> None:
    client = env[0]
    iid = client.load("stateful", {})
    zygote = client.execute(iid, {"add": 1}, timeout=60)["zygote"]
    error = failure(env, "stateful", instance_id=iid, operation="kill_zygote")
    assert error.type is ErrorType.SECURITY
    native = client.execute(iid, {"native": True}, operation="kill_zygote", timeout=60)
    assert native["result"] == -1  # Landlock's signal scope refuses it below the hook
    assert client.execute(iid, {"add": 2}, timeout=60)["zygote"] == zygote
    client.unload(iid)
    assert_unharmed(env)


def test_a_zygote_killed_mid_run_fails_that_run_and_is_replaced(env: Env) -> None:
    client = env[0]
    iid = client.load("stateful", {})
    zygote = client.execute(iid, {"add": 1}, timeout=60)["zygote"]
    job = client.submit("stateful", {"seconds": 20}, instance_id=iid, operation="sleep")
    assert wait_until(lambda: len(psutil.Process(zygote).children()) == 1, timeout_s=20)
    os.kill(zygote, signal.SIGKILL)
    with pytest.raises(PluginExecutionError) as info:
        job.result(timeout=60)
    assert info.value.type is ErrorType.RUNTIME
    assert info.value.details["sandbox_died"] is True
    after = client.execute(iid, {"add": 2}, timeout=60)
    assert after["zygote"] != zygote and after["setups"] == 2
    client.unload(iid)
    assert_unharmed(env)


def test_a_zygote_that_died_between_runs_is_replaced_without_an_error(env: Env) -> None:
    client = env[0]
    iid = client.load("stateful", {})
    zygote = client.execute(iid, {"add": 1}, timeout=60)["zygote"]
    os.kill(zygote, signal.SIGKILL)
    assert wait_until(lambda: not psutil.pid_exists(zygote), timeout_s=10)
    after = client.execute(iid, {"add": 2}, timeout=60)
    assert after["zygote"] != zygote and after["items"] == [2]
    client.unload(iid)


def test_a_setup_that_raises_is_typed_and_counts_toward_the_breaker(env: Env) -> None:
    for _ in range(2):
        error = failure(env, "setup-raises")
        assert error.type is ErrorType.RUNTIME
        assert error.details["phase"] == "setup"
        assert error.details["exception_type"] == "ValueError"
        # What the setup wrote before it failed comes with its error.
        assert "stdout: setup is looking for its model" in error.details["logs"]
        assert "WARNING" in error.details["logs"] and "no model under" in error.details["logs"]
    refused_at_submit = False
    deadline = time.monotonic() + env[0].settings.breaker_gate_cache_ms / 1000 + 5
    while not refused_at_submit and time.monotonic() < deadline:
        try:
            late = env[0].submit("setup-raises", {})
        except CircuitOpenError:
            refused_at_submit = True
        else:  # the open breaker's event not yet heard here: the worker's gate refuses it
            with pytest.raises(CircuitOpenError):
                late.result(timeout=30)
    assert refused_at_submit
    assert_unharmed(env)


def test_what_a_setup_writes_shows_in_the_logs_of_the_job_that_set_it_up(env: Env) -> None:
    client = env[0]
    iid = client.load("chatty")
    logs = []
    for n in (1, 2):
        job = client.submit("chatty", {"n": n}, instance_id=iid)
        assert job.result(timeout=60) == n
        logs.append(str(job.meta["logs"]))
    first, second = logs
    assert "stdout: setup is loading its table" in first and "setup logger says hello" in first
    assert first.index("setup is loading") < first.index("stdout: run 1")
    assert "run logger 1" in first
    # Later runs show their own output only, though the setup rebound sys.stdout.
    assert "setup" not in second
    assert "stdout: run 2" in second and "run logger 2" in second
    client.unload(iid)


def test_a_setup_printing_one_huge_string_still_sets_up(env: Env) -> None:
    job = env[0].submit("huge-setup-print", {})
    assert job.result(timeout=60) == "ran"
    assert "stdout: setup done" in job.meta["logs"]
    assert "bytes of earlier output dropped" in job.meta["logs"]


def test_a_teardown_writing_past_a_pipes_capacity_finishes(env: Env) -> None:
    """Nobody reads a zygote's output pipes during its teardown: its writes to
    descriptor 1 go nowhere rather than block it until it is killed."""
    client = env[0]
    iid = client.load("loud-teardown", {})
    zygote = client.execute(iid, {}, timeout=60)["zygote"]
    client.unload(iid)
    retired = f"(pid {zygote}) retired (instance unloaded); teardown ran"
    assert wait_until(lambda: retired in env[1].log_text(), timeout_s=15)
    assert_unharmed(env)


def test_a_setup_that_hangs_stops_at_setup_timeout(env: Env) -> None:
    started = time.monotonic()
    error = failure(env, "setup-hangs")
    assert error.type is ErrorType.TIMEOUT
    assert error.details["limit"] == "setup_timeout_ms"
    assert time.monotonic() - started < 1 + 10
    assert_unharmed(env)


def test_a_setup_that_allocates_past_the_limit_is_a_resource_error(env: Env) -> None:
    error = failure(env, "setup-allocates")
    assert error.type is ErrorType.RESOURCE
    assert error.details["phase"] == "setup"
    assert error.details["limit"] == "max_memory_mb"
    assert_unharmed(env)


@pytest.mark.parametrize("plugin", ["setup-thread", "setup-thread-at-gc"])
def test_a_setup_that_leaves_threads_is_refused(env: Env, plugin: str) -> None:
    """Also one whose thread starts from a gc callback, at the zygote's collection after
    the setup's own check."""
    error = failure(env, plugin)
    assert error.type is ErrorType.RUNTIME
    assert error.details["threads"] >= 2
    assert_unharmed(env)


@pytest.mark.parametrize("action", ["read", "write", "connect", "spawn", "fork"])
def test_forbidden_actions_during_setup_are_security_errors(env: Env, action: str,
                                                            tmp_path: Path) -> None:
    client = env[0]
    target = tmp_path / "escaped.txt"
    iid = client.load("setup-forbidden", {"action": action, "path": str(target),
                                          "port": client.redis.connection_pool
                                          .connection_kwargs.get("port", 6379)})
    error = failure(env, "setup-forbidden", instance_id=iid)
    assert error.type is ErrorType.SECURITY, error
    assert error.details["phase"] == "setup"
    assert not target.exists()
    client.unload(iid)
    assert_unharmed(env)


def test_a_setup_that_breaks_what_the_zygotes_rehearsal_uses_still_serves_runs(
        env: Env) -> None:
    """The zygote rehearses a run's pure steps after the setup (runtime/run.py: rehearse);
    a setup that broke them leaves runs colder, not failing."""
    client = env[0]
    for n in range(3):
        assert client.submit("setup-breaks-pipes", {"n": n}).result(timeout=30) == {
            "ran": {"n": n}}
    assert_unharmed(env)


def test_a_run_never_sees_what_an_earlier_run_left_in_its_workspace(env: Env) -> None:
    """Every run of a warm sandbox gets the same directory (its Landlock rule is built once),
    emptied and put back as it was created after each run."""
    client = env[0]
    first, second, third = (client.submit("traces", {}).result(timeout=30) for _ in range(3))
    assert len({first["pid"], second["pid"], third["pid"]}) == 3
    for seen in (first, second, third):
        assert seen["entries"] == []
        assert seen["mode"] == 0o700
        assert seen["cwd"] == seen["workspace"] == first["workspace"]
        assert seen["mtime_ns"] == first["mtime_ns"]
    assert_unharmed(env)


def homes_and_records(warm_root: Path) -> tuple[list[str], list[str]]:
    homes = sorted(path.name for path in warm_root.iterdir()
                   if path.name != owners.OWNERS_DIR)
    records = []
    for path in (warm_root / owners.OWNERS_DIR).glob("*.json"):
        with contextlib.suppress(FileNotFoundError):  # a retirement ending meanwhile
            records.append(Path(json.loads(path.read_text())["home"]).name)
    return homes, sorted(records)


def test_nothing_is_left_in_the_warm_root_but_live_sandboxes(env: Env) -> None:
    warm_root = env[2]
    # One record per home (a retirement in the housekeeper may be ending meanwhile).
    assert wait_until(lambda: operator.eq(*homes_and_records(warm_root)), timeout_s=10)
    homes = set(homes_and_records(warm_root)[0])
    zygotes = [proc for proc in psutil.process_iter(["cmdline"])
               if "pluginpool_sandbox_runtime" in " ".join(proc.info["cmdline"] or [])]
    assert len(homes) <= 4  # PLUGINPOOL_WARM_SANDBOXES, the default
    for home in warm_root.iterdir():
        if home.name == owners.OWNERS_DIR:
            continue
        assert {entry.name for entry in home.iterdir()} <= {"setup", "run"}
        run_workspace = home / "run"
        assert not run_workspace.exists() or list(run_workspace.iterdir()) == [], \
            "the run workspace is emptied after every run"
    assert zygotes or not homes


@pytest.mark.parametrize("victim", ["the pool child's process group", "the worker",
                                    "a bystander"])
def test_a_setup_that_makes_its_zygote_name_another_process_harms_nobody(
        env: Env, victim: str) -> None:
    """Before, the pool child signalled whatever pid the zygote's Forked named: 0 (its own
    process group) took the whole worker down, any other pid was killed at the run's end."""
    client, worker, _ = env
    bystander = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        pid = {"the pool child's process group": 0, "the worker": worker.pid,
               "a bystander": bystander.pid}[victim]
        iid = client.load("forges-pid", {"pid": pid})
        error = failure(env, "forges-pid", instance_id=iid)
        assert error.type is ErrorType.RUNTIME and error.details["sandbox_died"]
        assert bystander.poll() is None
        assert_unharmed(env)
        client.unload(iid)
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("error_type", ["bogus", "runtime"])
def test_a_run_that_sends_a_mistyped_frame_gets_a_typed_error(env: Env,
                                                               error_type: str) -> None:
    """Before: an untyped TypeError or ValueError in the pool child, past the breaker and
    the run records."""
    error = failure(env, "breaks-channel", operation="mistyped", payload={"type": error_type})
    assert error.type is ErrorType.RUNTIME
    if error_type == "bogus":
        assert error.details["protocol_error"] is True
        assert "bogus" in error.details["reason"]
    else:  # its details cannot replace the error's own fields or the pool child's usage
        assert error.message == "forged"
        assert "type_" not in error.details
        assert error.details["usage"]["sandboxed"] is True
    assert_unharmed(env)


def test_a_run_that_stalls_its_channel_still_stops_at_its_wall_clock(env: Env) -> None:
    """Before, the pool child blocked reading the rest of the frame until Celery's soft
    limit: setup_timeout_ms + timeout_ms + 2 s = 23 s."""
    started = time.monotonic()
    error = failure(env, "breaks-channel", operation="half_frame")
    assert error.type is ErrorType.TIMEOUT
    assert time.monotonic() - started < 1 + 12
    assert_unharmed(env)


def test_a_run_that_does_not_read_its_storage_replies_is_stopped(env: Env) -> None:
    """Before, the pool child blocked writing replies nobody read, until Celery's soft limit
    (and then, with a deadline, until the run's own: no sample, no throttle meanwhile)."""
    error = failure(env, "breaks-channel", operation="storage_flood")
    assert error.type is ErrorType.RUNTIME
    assert error.details["protocol_error"] is True
    assert "storage reply" in error.details["reason"]
    assert_unharmed(env)


def test_a_teardown_that_stalls_its_channel_is_cut_at_the_teardown_bound(env: Env) -> None:
    """Before, the housekeeper thread blocked for good on the half frame: no sandbox of that
    pool process was retired again."""
    client, worker, _ = env
    iid = client.load("breaks-channel", {"teardown": "half_frame"})
    assert client.execute(iid, {}, timeout=60) == "fine"
    assert wait_until(lambda: bool(client.sandbox_info(iid).warm_sandboxes), timeout_s=10)
    zygote = client.sandbox_info(iid).warm_sandboxes[0].pid
    client.unload(iid)
    cut = f"(pid {zygote}) retired (instance unloaded); teardown cut short"
    assert wait_until(lambda: cut in worker.log_text(), timeout_s=20)
    other = client.load("stateful", {})
    second = client.execute(other, {"add": 1}, timeout=60)["zygote"]
    client.unload(other)
    ran = f"(pid {second}) retired (instance unloaded); teardown ran"
    assert wait_until(lambda: ran in worker.log_text(), timeout_s=15)
    assert_unharmed(env)


def test_a_run_in_flight_at_unload_leaves_nothing_of_its_instance_behind(env: Env) -> None:
    """Before, its usage totals and last logs were written after unload had deleted them,
    re-created with no expiry, kept for ever."""
    client = env[0]
    iid = client.load("stateful", {})
    zygote = client.execute(iid, {"add": 1}, timeout=60)["zygote"]  # set up: the next job
    job = client.submit("stateful", {"seconds": 1.5}, instance_id=iid, operation="sleep")
    # Its run forked (a job marked started may still be setting up, and a setup that
    # reads its storage after the unload fails, as it should).
    def forked() -> bool:
        with contextlib.suppress(psutil.NoSuchProcess):
            return len(psutil.Process(zygote).children()) == 1
        return False

    assert wait_until(lambda: job.status() == "started" and forked(), timeout_s=30)
    client.unload(iid)
    assert job.result(timeout=60) == "slept"
    keys = client.settings.keys
    left = [key for key in (keys.instance(iid), keys.instance_usage(iid),
                            keys.instance_errors(iid)) if client.redis.exists(key)]
    assert left == []


@pytest.mark.parametrize("plugin", ["ghost-op", "function-ops"])
def test_a_listed_operation_the_plugin_lacks_fails_alone(env: Env, plugin: str) -> None:
    """Before, the setup failed (`dependency`) for every operation, `run` included, and
    opened the breaker, as in the pool child only that operation does not."""
    client = env[0]
    missing = "ghost" if plugin == "ghost-op" else "other"
    assert client.submit(plugin, {"add": 1}).result(timeout=60)
    error = failure(env, plugin, operation=missing)
    assert error.type is ErrorType.DEPENDENCY
    assert error.details["operation"] == missing
    assert client.submit(plugin, {"add": 2}).result(timeout=60)


def test_a_setup_that_leaves_no_descriptor_free_is_a_resource_error(env: Env) -> None:
    """Before, the zygote died after the setup (it needs descriptors to serve runs) and the
    job failed `runtime`, "the warm sandbox died during its setup", with no reason."""
    error = failure(env, "setup-hoards-fds")
    assert error.type is ErrorType.RESOURCE, error
    assert error.details["limit"] == "max_open_files"
    assert error.details["phase"] == "setup"
    assert_unharmed(env)


def test_what_a_setup_started_dies_with_its_zygote(env: Env) -> None:
    """The zygote's process group is killed also once the zygote is gone (review: a check
    that its leader was alive first left the setup's child running, unsupervised)."""
    started = time.monotonic()
    error = failure(env, "setup-forks-then-dies")
    # Its end is seen though the child holds the control socket (it waited for the
    # setup's timeout, 30 s, before)
    assert error.type is ErrorType.RUNTIME and error.details["phase"] == "setup"
    assert time.monotonic() - started < 20
    [child] = [int(pid) for pid in re.findall(r"forked (\d+)", error.details["logs"])]
    assert wait_until(lambda: gone(child), timeout_s=10)
    assert_unharmed(env)


def test_a_daemon_left_by_a_run_dies_with_its_zygote_killed_from_outside(env: Env) -> None:
    """A run allowed processes leaves a daemon in a session of its own (not the run's or the
    zygote's process group, which are what get killed); the zygote, its reaper, is then
    SIGKILLed mid-run, so it cannot kill it after the run as it does. Its guardian, to
    which the daemon is re-parented, kills it (without one it lived on under PID 1)."""
    client, _worker, warm_root = env
    iid = client.load("daemonizes", {})
    job = client.submit("daemonizes", {}, instance_id=iid)
    assert wait_until(lambda: storage(client, iid, "daemon") is not None, timeout_s=30)
    daemon = psutil.Process(storage(client, iid, "daemon"))
    try:
        zygote = psutil.Process(daemon.ppid())
        assert zygote.cwd().startswith(str(warm_root)) and daemon.pid != zygote.pid
        zygote.kill()
        with pytest.raises(PluginExecutionError):
            job.result(timeout=60)
        assert wait_until(lambda: gone(daemon.pid), timeout_s=10), "the daemon lives on"
    finally:
        with contextlib.suppress(psutil.Error):  # it failed: not left for its 10 minutes
            daemon.kill()
    client.unload(iid)
    assert_unharmed(env)


def test_an_instances_usage_and_logs_are_kept_when_redis_lost_its_scripts(env: Env) -> None:
    """The instance's writes go by EVALSHA; after a Redis restart (here its script cache
    flushed) the first run's NOSCRIPT loads the script and writes again, before the result
    (whose script was lost too) is stored: a producer that has the result sees them."""
    client = env[0]
    iid = client.load("chatty", {})
    assert client.execute(iid, {"n": 1}, timeout=60) == 1
    client.redis.script_flush()
    assert client.execute(iid, {"n": 2}, timeout=60) == 2
    usage = client.redis.hgetall(client.settings.keys.instance_usage(iid))
    assert usage.get("runs") == "2" and "run 2" in usage.get("last_logs", ""), usage
    client.unload(iid)


def test_a_throttled_run_gets_storage_replies_larger_than_its_socket_buffer(env: Env) -> None:
    """At 10 % of a core the run is stopped (SIGSTOP) most of the time, often with a storage
    request waiting (pp_testplugins.throttle): it is let run (SIGCONT) to read its 600 KB
    reply, then stopped again. Without that the write stalls past its 1 s bound and the
    run ends as a protocol error (it did, in 3 runs of 3, with the SIGCONT taken out)."""
    client = env[0]
    iid = client.load("throttled-storage", {})
    reads = client.execute(iid, {"seconds": 3}, timeout=60)
    assert reads >= 3
    client.unload(iid)


def gone(pid: int) -> bool:
    """No such process, or only its exit status left (reaped by whoever adopted it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("plugin", ["setup-hangs-long", "setup-talks-long"])
def test_a_zygote_whose_pool_child_dies_during_its_setup_ends_with_it(env: Env,
                                                                       plugin: str) -> None:
    """The pool child bounds a setup's wall time; a zygote has no parent to die with. A
    setup that sleeps must not outlive its pool child (SIGKILLed here) by its own 2 minutes
    or an hour: the zygote sees its control socket end, empties its home and exits; so does
    an idle set-up one. (Both used to leave their homes: the Closed they sent to the gone
    pool child killed them by SIGPIPE first.)"""
    client, worker, warm_root = env

    def zygotes() -> dict[int, Path]:
        found = {}
        for proc in psutil.process_iter(["cwd"]):
            if (proc.info["cwd"] or "").startswith(str(warm_root)):
                found[proc.pid] = Path(proc.info["cwd"])
        return found

    iid = client.load("stateful", {})
    idle = client.execute(iid, {"add": 1}, timeout=60)["zygote"]  # set up, then idle
    before = zygotes()
    pool = [child.pid for child in psutil.Process(worker.pid).children()]
    job = client.submit(plugin, {})
    assert wait_until(lambda: bool(zygotes().keys() - before.keys()), timeout_s=30)
    setting_up = {pid: cwd for pid, cwd in zygotes().items() if pid not in before}
    setting_up[idle] = before[idle]
    for pid in pool:
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: all(gone(pid) for pid in setting_up),
                      timeout_s=15), "a zygote outlived its pool child"
    def emptied(home: Path) -> bool:
        try:
            return not any(home.iterdir())
        except FileNotFoundError:  # removed (by a sweep)
            return True

    for workspace in setting_up.values():  # each home: emptied (a sweep may remove it)
        assert wait_until(lambda w=workspace: emptied(w.parent), timeout_s=10), \
            sorted(workspace.parent.iterdir())
    with pytest.raises(PluginExecutionError):
        job.result(timeout=60)
    client.unload(iid)
    assert_unharmed(env)


def zygotes_in(warm_root: Path) -> dict[int, str]:
    """Processes working under the warm root (zygotes), with their state."""
    found = {}
    for proc in psutil.process_iter(["cwd", "status"]):
        if (proc.info["cwd"] or "").startswith(str(warm_root)):
            found[proc.pid] = proc.info["status"]
    return found


def orphan_a_setting_up_zygote(env: Env, plugin: str, *,
                               stopped: bool) -> tuple[psutil.Process, Path]:
    """Start `plugin`'s setup, wait for its zygote (stopped, if asked), SIGKILL the worker's
    pool process; the zygote and its home, once the job has failed."""
    client, worker, warm_root = env
    before = set(zygotes_in(warm_root))
    pool = [child.pid for child in psutil.Process(worker.pid).children()]
    job = client.submit(plugin, {})

    def new_one() -> int | None:
        return next((pid for pid, status in zygotes_in(warm_root).items() if pid not in before
                     and (not stopped or status == psutil.STATUS_STOPPED)), None)

    found: list[int | None] = []
    assert wait_until(lambda: bool(found.append(new_one()) or found[-1]), timeout_s=30)
    assert found[-1] is not None
    zygote = psutil.Process(found[-1])
    home = Path(zygote.cwd()).parent
    if stopped:
        # Stopped for sure when its pool child dies (its throttle might have let it run a
        # slice, and then it would have ended itself through its watch).
        os.kill(zygote.pid, signal.SIGSTOP)
    else:
        time.sleep(0.5)  # its setup is under way
    for pid in pool:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(PluginExecutionError):
        job.result(timeout=60)
    return zygote, home


def test_a_stopped_zygote_whose_pool_child_died_is_killed(env: Env) -> None:
    """A setup held at 10 % of a core is stopped (SIGSTOP) most of the time; stopped when its
    pool child is SIGKILLed, its zygote can watch for nothing and would stay stopped for
    good. Its guardian kills it at once; the pool child's replacement finds it in the
    owners' records (its owner's pid and start time are no process's now) and removes its
    home (and would kill it, had the guardian not)."""
    zygote, home = orphan_a_setting_up_zygote(env, "setup-spins-throttled", stopped=True)
    assert wait_until(lambda: gone(zygote.pid), timeout_s=20), "the stopped zygote lives on"
    assert_unharmed(env)
    assert wait_until(lambda: not home.exists(), timeout_s=10)


def test_a_setup_that_undoes_its_watch_is_killed_once_its_grace_is_over(env: Env) -> None:
    """Its zygote ignores SIGIO, so it does not see its pool child (SIGKILLed here) go; its
    guardian kills it after the grace (10 s) its teardown could take, and the new pool
    process's sweep, finding it running first, marks it, then removes its home."""
    zygote, home = orphan_a_setting_up_zygote(env, "setup-undoes-the-watch", stopped=False)
    assert not gone(zygote.pid), "the watch was undone: it lives until the grace is over"
    assert wait_until(lambda: gone(zygote.pid), timeout_s=45), "the orphan lives on"
    assert wait_until(lambda: not home.exists(), timeout_s=10)
    assert_unharmed(env)


def test_an_exception_whose_str_raises_is_one_runtime_error_not_a_dead_process(
        env: Env) -> None:
    """Before, the run's process died describing it: `process_died`, and the job ran again
    (4 times with the default restarts); the same in a setup: "the warm sandbox died"."""
    client = env[0]
    iid = client.load("unprintable", {})
    with pytest.raises(PluginExecutionError) as info:
        client.execute(iid, {}, timeout=60)
    error = info.value
    assert error.type is ErrorType.RUNTIME
    assert error.details["exception_type"] == "Unprintable"
    assert "str() raised" in error.message and not error.details.get("process_died")
    assert storage(client, iid, "runs") == 1  # run once, not restarted
    client.unload(iid)
    error = failure(env, "setup-unprintable")
    assert error.type is ErrorType.RUNTIME and error.details["phase"] == "setup", error
    assert error.details["exception_type"] == "Unprintable"
    assert_unharmed(env)


@pytest.mark.parametrize("plugin", ["huge-message", "setup-huge-message"])
def test_a_huge_exception_message_is_cut_not_misreported(env: Env, plugin: str) -> None:
    """Before: a 5 MB message made the run's error frame an oversized result (`resource`,
    max_result_bytes), and a setup's the setup report's (the sandbox "died")."""
    error = failure(env, plugin)
    assert error.type is ErrorType.RUNTIME, error
    assert error.details["exception_type"] == "ValueError"
    assert "truncated" in error.message and len(error.message) < 10_000
    assert_unharmed(env)


@pytest.mark.parametrize("plugin", ["raising-property", "raising-property-in-pool"])
def test_a_listed_operation_whose_lookup_raises_fails_alone(env: Env, plugin: str) -> None:
    """Before, reading it failed the setup: every operation, `run` included, failed."""
    client = env[0]
    assert client.submit(plugin, {}).result(timeout=60) is True
    error = failure(env, plugin, operation="boom")
    assert error.type is ErrorType.RUNTIME, error
    assert "property boom" in error.message and error.details["operation"] == "boom"
    assert client.submit(plugin, {}).result(timeout=60) is True


def test_a_keyboard_interrupt_from_an_unsandboxed_plugin_does_not_kill_its_process(
        env: Env) -> None:
    """A pool process ignores SIGINT, so a KeyboardInterrupt is the plugin's: before, it
    left the job (billiard's WorkerLostError) and the process with it, on every retry."""
    worker = env[1]
    pool = sorted(child.pid for child in psutil.Process(worker.pid).children())
    error = failure(env, "interrupts-in-pool")
    assert error.type is ErrorType.RUNTIME, error
    assert error.details["exception_type"] == "KeyboardInterrupt"
    assert sorted(child.pid for child in psutil.Process(worker.pid).children()) == pool
    assert_unharmed(env)


def test_a_listed_operation_the_code_lacks_does_not_open_the_breaker(env: Env) -> None:
    """`dependency` errors open a breaker at once, but a call of one listed operation the
    class lacks says nothing of the others: it is not counted (the other operations would
    all be refused), and is still reported and kept in the health figures."""
    client = env[0]
    plugin = "ghost-op-default-breaker"
    for _ in range(3):
        assert failure(env, plugin, operation="ghost").details.get("operation_missing")
    assert client.breaker(plugin).state == "closed"
    assert client.submit(plugin, {"add": 1}).result(timeout=60)


def test_a_relative_plugin_path_serves_sandboxed_plugins(
        redis_url: str, tmp_path: Path) -> None:
    """A zygote works in its home: before, a relative `PLUGINPOOL_PLUGIN_PATHS` entry named
    nothing there, and every sandboxed plugin failed `dependency` (cannot import) while
    unsandboxed ones worked. Settings now make it absolute, from the working directory."""
    relative = os.path.relpath(TEST_PLUGINS)
    assert not os.path.isabs(relative)
    settings = make_settings(redis_url, key_prefix=f"pprel:{uuid.uuid4().hex[:8]}:",
                             warm_root=str(tmp_path / "warm"))
    assert Settings(_env_file=None, plugin_paths=[relative]).plugin_paths == [  # type: ignore[call-arg]
        str(TEST_PLUGINS)]
    with PluginClient(settings) as client:
        client.register(spec("relative-good", "basic:echo"))
        worker = spawn_worker(client, tmp_path, concurrency=1, extra_env={
            "PLUGINPOOL_PLUGIN_PATHS": json.dumps([relative])})
        try:
            value = client.submit("relative-good", {"x": 1}).result(timeout=60)
            assert value["payload"] == {"x": 1}
        finally:
            worker.stop()


@pytest.mark.parametrize("plugin", ["writes-after", "writes-after-in-pool"])
def test_a_write_after_unload_raises_the_same_error_sandboxed_or_not(
        env: Env, plugin: str) -> None:
    """Before, a sandboxed run got a plain ValueError where the pool child raises
    InstanceUnloadedError (a ValueError too)."""
    client = env[0]
    iid = client.load(plugin, {})
    assert client.execute(iid, {}, timeout=60) == "written"  # set up
    job = client.submit(plugin, {"seconds": 4}, instance_id=iid)
    assert wait_until(lambda: job.status() == "started", timeout_s=30)
    client.unload(iid)
    assert job.result(timeout=60) == ["InstanceUnloadedError", True]


@pytest.mark.parametrize("plugin", ["logs-levels", "logs-levels-in-pool"])
def test_ctx_logger_keeps_every_level_sandboxed_or_not(env: Env, plugin: str) -> None:
    """Before, a sandboxed ctx.logger kept DEBUG lines and an unsandboxed one dropped them
    (it took the worker's level) and also sent them to the worker's own log."""
    client = env[0]
    job = client.submit(plugin, {})
    assert job.result(timeout=60) is True
    logs = str(job.meta["logs"])
    assert "DEBUG pluginpool.plugin." in logs and "a debug line" in logs, logs
    assert "an info line" in logs
