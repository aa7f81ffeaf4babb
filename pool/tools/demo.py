"""`pluginpool demo`: Redis, a worker and Flower on this machine, and a stream of example jobs.

Shows a table per plugin (runs, successes, failures by type) refreshing as it goes.
Everything it starts it stops again, by PID.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pluginpool.policy.errors import CircuitOpenError, PluginExecutionError
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.pool.tools.redis_bootstrap import ReachableRedis, ensure_redis, free_port
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.jobs import FallbackJob, Job
from pluginpool.tasks.settings import Settings

MAX_IN_FLIGHT = 40


@dataclass
class Tally:
    runs: int = 0
    succeeded: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    refused: int = 0
    """Refused by the plugin's circuit breaker (at submit or at the worker), no fallback."""
    fallback: int = 0
    """Refused by the breaker and answered by the plugin's fallback."""
    breaker: str = "closed"

    def as_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "succeeded": self.succeeded, "failed": dict(self.failed),
                "refused": self.refused, "fallback": self.fallback, "breaker": self.breaker}


def default_examples_dir() -> Path:
    here = Path(__file__).resolve().parents[2] / "examples"
    return here if here.is_dir() else Path.cwd() / "examples"


def job_stream(word_count_instance: str) -> itertools.cycle[tuple[str, Any, str | None]]:
    """A repeating mix: mostly healthy work, some failures of every kind."""
    text = "the quick brown fox jumps over the lazy dog The"
    healthy: list[tuple[str, Any, str | None]] = [
        ("word-count", {"text": text}, word_count_instance), ("noop", {"n": 1}, None)]
    flaky: tuple[str, Any, str | None] = ("flaky", {"failure_rate": 0.4}, None)
    failing: list[tuple[str, Any, str | None]] = [flaky] * 4 + [
        ("sleepy", {"seconds": 3}, None), ("needs-missing", {}, None)]
    mix = healthy * 6 + failing
    rare: list[tuple[str, Any, str | None]] = [("crasher", {}, None)]
    return itertools.cycle(mix * 3 + rare)


def render(tallies: dict[str, Tally], elapsed_s: float, flower_url: str) -> Table:
    table = Table(title=f"pluginpool demo: {elapsed_s:5.1f} s   (Flower: {flower_url})")
    for column in ("plugin", "runs", "ok", "runtime", "timeout", "dependency", "resource",
                   "security", "refused", "fallback", "breaker"):
        table.add_column(column, justify="left" if column == "plugin" else "right")
    for plugin_id in sorted(tallies):
        tally = tallies[plugin_id]
        table.add_row(plugin_id, str(tally.runs), f"[green]{tally.succeeded}[/]",
                      *(f"[red]{tally.failed[kind]}[/]" if tally.failed[kind] else "0"
                        for kind in ("runtime", "timeout", "dependency", "resource",
                                     "security")),
                      str(tally.refused), str(tally.fallback), _breaker_cell(tally.breaker))
    return table


def _breaker_cell(state: str) -> str:
    colour = {"closed": "green", "half_open": "yellow"}.get(state, "red")
    return f"[{colour}]{state}[/]"


def _submit(client: PluginClient, tallies: dict[str, Tally], plugin_id: str, payload: Any,
            instance_id: str | None) -> Job | FallbackJob | None:
    try:
        job = client.submit(plugin_id, payload, instance_id=instance_id)
    except CircuitOpenError:
        tallies[plugin_id].refused += 1
        return None
    if isinstance(job, FallbackJob):
        tallies[plugin_id].fallback += 1
        return None
    return job


def _collect(in_flight: list[Job | FallbackJob],
             tallies: dict[str, Tally]) -> list[Job | FallbackJob]:
    still = []
    for job in in_flight:
        if not job.ready():
            still.append(job)
            continue
        tally = tallies[job.plugin_id]
        try:
            job.result(timeout=1)
            tally.runs += 1
            tally.succeeded += 1
        except PluginExecutionError as exc:
            tally.runs += 1
            tally.failed[str(exc.type)] += 1
        except CircuitOpenError:
            tally.refused += 1
        job.forget()
    return still


def _worker_ready(app: Celery, nodename: str) -> bool:
    return bool(app.control.ping(destination=[nodename], timeout=0.5))


def run_demo(*, duration_s: float | None, as_json: bool, examples: Path | None = None,
             reset: bool = False) -> int:
    """Run the demo; `reset` first closes the example plugins' breakers, which the
    misbehaving plugins of a previous run (on the same Redis) left open."""
    console = Console(stderr=as_json)
    examples_dir = (examples or default_examples_dir()).resolve()
    base = Settings.from_env()
    run_dir = Path(tempfile.mkdtemp(prefix="pluginpool-demo-"))
    reachable: ReachableRedis = ensure_redis(base.redis_url, run_dir=run_dir)
    console.print(f"Redis: {reachable.url} ({reachable.how})")
    settings = Settings.from_env(redis_url=reachable.url, plugin_paths=[str(examples_dir)])
    env = {**os.environ, "PLUGINPOOL_REDIS_URL": reachable.url,
           "PLUGINPOOL_PLUGIN_PATHS": json.dumps([str(examples_dir)])}
    client = PluginClient(settings)
    registered = client.register(examples_dir / "plugins.toml")
    if reset:
        for spec in registered:
            client.override_breaker(spec.id, "reset")
        console.print(f"breakers reset: {', '.join(spec.id for spec in registered)}")
    nodename = f"demo-{os.getpid()}@localhost"
    flower_port = free_port()
    flower_url = f"http://127.0.0.1:{flower_port}"
    cli = [sys.executable, "-m", "pluginpool.pool.tools.cli"]
    worker = ManagedProcess([*cli, "worker", "--plugins", "all", "--concurrency", "2",
                             "--name", nodename], env=env, log_path=run_dir / "worker.log")
    flower = ManagedProcess([*cli, "flower", "--port", str(flower_port)], env=env,
                            log_path=run_dir / "flower.log")
    tallies: dict[str, Tally] = defaultdict(Tally)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    started = time.monotonic()
    try:
        if not wait_until(lambda: _worker_ready(client.app, nodename), timeout_s=60):
            console.print(f"[red]worker did not start; log: {run_dir / 'worker.log'}[/]")
            return 1
        console.print(f"worker {nodename} ready; Flower on {flower_url}; logs in {run_dir}")
        instance = client.load("word-count", initial_data={"lowercase": True})
        stream = job_stream(instance)
        in_flight: list[Job | FallbackJob] = []
        with Live(render(tallies, 0, flower_url), console=console, refresh_per_second=4,
                  transient=as_json) as live:
            while not stop:
                elapsed = time.monotonic() - started
                if duration_s is not None and elapsed >= duration_s:
                    break
                for _ in range(MAX_IN_FLIGHT - len(in_flight)):
                    plugin_id, payload, iid = next(stream)
                    job = _submit(client, tallies, plugin_id, payload, iid)
                    if job is not None:
                        in_flight.append(job)
                in_flight = _collect(in_flight, tallies)
                for plugin_id, tally in tallies.items():
                    tally.breaker = str(client.breaker(plugin_id).state)
                live.update(render(tallies, elapsed, flower_url))
                time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        worker.stop()
        flower.stop()
        if reachable.pid is not None:
            os.kill(reachable.pid, signal.SIGTERM)
        client.close()
    summary = {
        "duration_s": round(time.monotonic() - started, 1),
        "redis": reachable.how,
        "worker": nodename,
        "flower_url": flower_url,
        "plugins": {pid: tally.as_dict() for pid, tally in sorted(tallies.items())},
        "totals": {
            "runs": sum(t.runs for t in tallies.values()),
            "succeeded": sum(t.succeeded for t in tallies.values()),
            "failed": dict(sum((t.failed for t in tallies.values()), Counter())),
        },
    }
    if as_json:
        print(json.dumps(summary, indent=2))
    return 0
