"""Class plugins in the pool child (`sandboxed = false`) follow a warm sandbox's lifecycle:
setup without a job, teardown when pushed out (after the job that pushed it, never inside
it), idle, unloaded or at shutdown; a teardown that raises harms nobody. In-process here;
the worker-level cases are in test_warm_retirement.py."""

from __future__ import annotations

import logging
import sys
import time
import uuid
from typing import Any

import pytest

from pluginpool.policy.errors import ErrorType, PluginExecutionError
from pluginpool.policy.limits import Permissions, ResourceLimits
from pluginpool.pool.in_process_instances import TEARDOWN_WAIT_S, InProcessInstances
from pluginpool.pool.loader import PluginLoader
from pluginpool.pool.runner import InProcessRunner
from pluginpool.pool.tools.processes import wait_until
from pluginpool.tasks.context import PluginContext
from pluginpool.tasks.spec import PluginSpec
from tests.conftest import TEST_PLUGINS


@pytest.fixture(autouse=True)
def plugins_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))
    sys.modules.pop("pp_testplugins.lifecycle", None)


def spec(plugin_id: str, entrypoint: str) -> PluginSpec:
    return PluginSpec.model_validate({"id": plugin_id, "name": plugin_id,
                                      "entrypoint": f"pp_testplugins.{entrypoint}",
                                      "isolation": {"sandboxed": False}})


def ctx(plugin: PluginSpec, instance_id: str | None = None) -> PluginContext:
    return PluginContext(plugin_id=plugin.id, job_id="job-1", instance_id=instance_id,
                         attempt=1, limits=ResourceLimits(), permissions=Permissions())


def runner(capacity: int) -> InProcessRunner:
    return InProcessRunner(PluginLoader(registered=lambda _pid: True),
                           max_result_bytes=1 << 20,
                           instances=InProcessInstances(idle_s=3600, capacity=capacity))


def test_a_teardown_runs_after_the_job_that_pushed_it_out_and_cannot_fail_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """Before, it ran inside the next job (any plugin's): its print went to that job's logs
    and its exception failed that job, counted against the wrong plugin."""
    run = runner(capacity=1)
    bad = spec("closes-badly", "lifecycle:ClosesBadly")
    echo = spec("echo", "basic:echo")
    assert run.run(bad, ctx(bad), {}).value == {"job_in_setup": None}  # no job in setup
    with caplog.at_level(logging.INFO, logger="pluginpool.in_process"):
        report = run.run(echo, ctx(echo), {"x": 1})
    assert report.value["payload"] == {"x": 1}
    assert "closing badly" not in report.logs
    assert any("retired (least recently used); teardown failed: RuntimeError: close "
               "exploded" in record.getMessage() for record in caplog.records)


def test_unload_idle_and_shutdown_tear_instances_down(caplog: pytest.LogCaptureFixture
                                                     ) -> None:
    instances = InProcessInstances(idle_s=3600, capacity=16)
    run = InProcessRunner(PluginLoader(registered=lambda _pid: True), max_result_bytes=1 << 20,
                          instances=instances)
    stateful = spec("stateful-in", "lifecycle:ClosesBadly")
    for iid in ("a", "b", "c"):
        run.run(stateful, ctx(stateful, iid), {})
    with caplog.at_level(logging.INFO, logger="pluginpool.in_process"):
        instances.retire_instance("a")
        instances.idle_s = 0
        instances.retire_idle()
        instances.retire_all()
    said = [record.getMessage() for record in caplog.records]
    assert sum("'a')" in line and "(instance unloaded)" in line for line in said) == 1
    assert sum("(idle)" in line for line in said) == 2
    assert not any("(shutdown)" in line for line in said)  # idle took the others


def test_a_setup_that_fails_is_typed_with_its_phase() -> None:
    run = runner(capacity=4)
    fails = spec("fails-setup", "lifecycle:FailsSetup")
    with pytest.raises(PluginExecutionError) as info:
        run.run(fails, ctx(fails), {})
    assert info.value.type is ErrorType.RUNTIME
    assert info.value.details["phase"] == "setup"
    assert "missing config" in info.value.message


def test_a_listed_operation_missing_from_the_class_fails_only_that_operation() -> None:
    run = runner(capacity=4)
    ghost = PluginSpec.model_validate({
        "id": "ghost-in", "name": "ghost", "entrypoint": "pp_testplugins.lifecycle:ClosesBadly",
        "operations": ["run", "ghost"], "isolation": {"sandboxed": False}})
    assert run.run(ghost, ctx(ghost), {}).value == {"job_in_setup": None}
    with pytest.raises(PluginExecutionError) as info:
        run.run(ghost, PluginContext(plugin_id="ghost-in", job_id="j", instance_id=None,
                                     attempt=1, limits=ResourceLimits(),
                                     permissions=Permissions(), operation="ghost"), {})
    assert info.value.type is ErrorType.DEPENDENCY




def test_an_unload_during_the_setup_tears_the_instance_down_after_its_first_run(
        caplog: pytest.LogCaptureFixture) -> None:
    instances = InProcessInstances(idle_s=3600, capacity=16)
    run = InProcessRunner(PluginLoader(registered=lambda _pid: True), max_result_bytes=1 << 20,
                          instances=instances)
    stateful = spec("unloaded-early", "lifecycle:ClosesBadly")
    instances.retire_instance("gone")  # heard while its setup runs
    with caplog.at_level(logging.INFO, logger="pluginpool.in_process"):
        assert run.run(stateful, ctx(stateful, "gone"), {}).value == {"job_in_setup": None}
    assert any("'gone') retired (instance unloaded)" in record.getMessage()
               for record in caplog.records)
    assert instances.get(("unloaded-early", stateful.revision, "gone")) is None


def listening_runner(redis_url: str) -> InProcessRunner:
    """One instance kept, with the pool process's listener thread (teardowns there)."""
    import redis

    instances = InProcessInstances(idle_s=3600, capacity=1,
                                   redis_client=redis.Redis.from_url(redis_url),
                                   unload_channel="pp-test-unused-unload-channel")
    return InProcessRunner(PluginLoader(registered=lambda _pid: True),
                           max_result_bytes=1 << 20, instances=instances)


def test_a_teardown_that_hangs_holds_up_no_job(redis_url: str) -> None:
    """Before, the listener ran close() holding the lock every job takes: one that hung
    held every in-process job of the pool process (and Celery's soft limit with them)."""
    run = listening_runner(redis_url)
    hangs = spec("hangs-at-close", "lifecycle:HangsAtClose")
    echo = spec("echo", "basic:echo")
    assert run.run(hangs, ctx(hangs, "h"), {}).value == "ran"
    started = time.monotonic()
    for i in range(4):  # the first pushes the hanging one out: its teardown starts
        assert run.run(echo, ctx(echo), {"i": i}).value["payload"] == {"i": i}
        time.sleep(1.2)  # the listener's tick: the teardown is under way
    # One job waited for it (TEARDOWN_WAIT_S), the later ones did not wait again.
    assert time.monotonic() - started < 4 * 1.2 + TEARDOWN_WAIT_S + 3


def test_a_teardown_that_hangs_holds_up_the_next_ones_for_a_while_only(
        redis_url: str) -> None:
    """Before, the listener ran each teardown itself: one whose close() never returned
    stopped every later teardown (unloads, idle ones, those pushed out) for good."""
    run = listening_runner(redis_url)  # one instance kept: each new one pushes one out
    hangs = spec("hangs-at-close", "lifecycle:HangsAtClose")
    marks = spec("records-close", "lifecycle:RecordsClose")
    first, second = f"m1-{uuid.uuid4().hex}", f"m2-{uuid.uuid4().hex}"
    assert run.run(hangs, ctx(hangs, "h"), {}).value == "ran"
    assert run.run(marks, ctx(marks, first), {}).value == "ran"  # the hanging one out
    assert run.run(marks, ctx(marks, second), {}).value == "ran"  # first out, behind it
    from pp_testplugins import lifecycle

    assert wait_until(lambda: first in lifecycle.CLOSED, timeout_s=3 * TEARDOWN_WAIT_S + 5)


def test_a_teardown_never_runs_beside_a_job(redis_url: str) -> None:
    """Before, a teardown in the listener thread could run during a later job: its prints
    went into that job's logs (stdout is the process's), or during the instance's own
    first run when it was unloaded while being set up."""
    run = listening_runner(redis_url)
    loud = spec("loud-close", "lifecycle:PrintsAtClose")
    sleepy = spec("sleepy", "basic:sleeps")
    assert run.run(loud, ctx(loud, "l"), {}).value == "ran"
    logs = [run.run(sleepy, ctx(sleepy), {"seconds": 0.5}).logs for _ in range(4)]
    assert not any("closing" in text for text in logs), logs


def test_a_hung_teardown_holds_neither_shutdown_nor_an_instance_in_use(
        caplog: pytest.LogCaptureFixture) -> None:
    """Fourth review: with the teardown holding the job's lock, shutdown waited for a hung
    one for ever; and once a job had stopped waiting for it, the next retirement could
    tear down the instance that job was running."""
    import threading

    instances = InProcessInstances(idle_s=0.0, capacity=16)
    run = InProcessRunner(PluginLoader(registered=lambda _pid: True), max_result_bytes=1 << 20,
                          instances=instances)
    hangs = spec("hangs-at-close", "lifecycle:HangsAtClose")
    sleepy = spec("sleepy-class", "lifecycle:SleepsThenChecks")
    assert run.run(hangs, ctx(hangs, "h"), {}).value == "ran"
    stuck = threading.Thread(target=instances.retire_idle, daemon=True)  # idle_s 0: due
    stuck.start()  # its close() hangs, as a listener's would
    deadline = time.monotonic() + 30
    while not instances._teardown_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert instances._teardown_running
    done: list[Any] = []
    job = threading.Thread(target=lambda: done.append(
        run.run(sleepy, ctx(sleepy, "s"), {"seconds": 2}).value))
    job.start()
    time.sleep(TEARDOWN_WAIT_S + 0.5)  # the job stopped waiting, its instance is set up
    retiring = threading.Thread(target=instances.retire_idle, daemon=True)
    retiring.start()  # must wait for the job: its instance is in use
    job.join(20)
    assert done == [{"closed_during_run": False}]
    started = time.monotonic()
    instances.retire_all()
    assert time.monotonic() - started < 10


SIGNAL_STORM = """
import json, signal, threading, time
from pluginpool.pool.in_process_instances import InProcessInstances

class Interrupted(Exception):
    pass

armed = False  # raise only around a job() (anywhere else would end this script)

def raise_interrupted(*_):
    if armed:
        raise Interrupted

instances = InProcessInstances(idle_s=3600)
stop = threading.Event()
main = threading.main_thread().ident

def pester():
    while not stop.is_set():
        signal.pthread_kill(main, signal.SIGUSR1)
        time.sleep(0.0002)

signal.signal(signal.SIGUSR1, raise_interrupted)
threading.Thread(target=pester, daemon=True).start()
interrupted = 0
until = time.monotonic() + 2
while time.monotonic() < until:
    try:
        armed = True
        with instances.job():
            pass
        armed = False
    except Interrupted:
        armed = False
        interrupted += 1
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
stop.set()
free = instances._turns.acquire(blocking=False)
print(json.dumps({"interrupted": interrupted, "job_running": instances._job_running,
                  "jobs_waiting": instances._jobs_waiting, "lock_free": free}))
"""


def test_a_signal_at_the_edge_of_a_job_leaves_the_turns_consistent() -> None:
    """Fifth review: Celery raises its soft limit (and a cancel) from a SIGUSR1 handler;
    landing between two steps of a job's bookkeeping, it left the flags or the lock held,
    and the listener waiting for good. Here SIGUSR1 arrives every 0.2 ms for 2 s (in a
    process of its own: the storm would reach pytest's own code)."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", SIGNAL_STORM], capture_output=True,
                          text=True, timeout=60, check=True)
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert state["interrupted"] > 0
    assert state == {**state, "job_running": False, "jobs_waiting": 0, "lock_free": True}
