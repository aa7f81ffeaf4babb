"""Flower, run by `pluginpool flower`, shows each plugin as its own task and queue."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.pool.tools.redis_bootstrap import free_port
from pluginpool.tasks.client import PluginClient
from tests.conftest import WorkerStarter, worker_env


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def reachable(url: str) -> bool:
    try:
        get_json(url)
        return True
    except OSError:
        return False


def test_flower_api_lists_plugin_tasks_and_queues(test_plugins: PluginClient,
                                                  start_worker: WorkerStarter,
                                                  tmp_path: Path) -> None:
    worker = start_worker(test_plugins, plugins="echo,raises")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    flower = ManagedProcess([sys.executable, "-m", "pluginpool.pool.tools.cli", "flower", "--port",
                             str(port)], env=worker_env(test_plugins.settings),
                            log_path=tmp_path / "flower.log")
    try:
        assert wait_until(lambda: reachable(f"{base}/api/workers"), timeout_s=30), \
            flower.log_text()
        # Flower's HTTP server answers before its event receiver has subscribed, and Redis
        # pub/sub keeps nothing for a subscriber that is not there yet: on a busy machine
        # the first jobs' events were lost for good (the flake). Probe until Flower shows a
        # job, which proves it is listening, then check the job under test.

        def listening() -> bool:
            probe = test_plugins.submit("echo", "probe")
            probe.result(timeout=20)
            return wait_until(lambda: probe.id in get_json(
                f"{base}/api/tasks?taskname=plugin.echo"), timeout_s=2)

        assert wait_until(listening, timeout_s=60), flower.log_text()[-2000:]
        ok = test_plugins.submit("echo", 2)
        ok.result(timeout=20)

        def seen() -> bool:
            tasks = get_json(f"{base}/api/tasks?taskname=plugin.echo")
            return tasks.get(ok.id, {}).get("state") == "SUCCESS"

        assert wait_until(seen, timeout_s=20), flower.log_text()[-2000:]
        task = get_json(f"{base}/api/task/info/{ok.id}")
        assert task["name"] == "plugin.echo" and task["state"] == "SUCCESS"
        def queues_of_worker() -> set[str]:
            # Flower asks the workers (inspect, 1 s timeout); on a busy machine an answer
            # can miss a round, so ask again until this worker's queues are in.
            workers = get_json(f"{base}/api/workers?refresh=1")
            entry = workers.get(worker.nodename, {})  # type: ignore[attr-defined]
            return {q["name"] for q in entry.get("active_queues") or []}

        assert wait_until(lambda: bool(queues_of_worker()), timeout_s=30)
        assert queues_of_worker() == {"plugins.echo", "plugins.raises"}
        lengths = get_json(f"{base}/api/queues/length")
        assert {"plugins.echo", "plugins.raises"} <= {q["name"] for q in lengths["active_queues"]}
    finally:
        flower.stop()
