"""`pluginpool health` and `pluginpool check-health`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pluginpool.policy.errors import PluginPoolError
from pluginpool.policy.health import HealthStatus, PluginHealth
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.health import live_workers
from pluginpool.tasks.settings import Settings

COLOURS = {HealthStatus.HEALTHY: "green", HealthStatus.DEGRADED: "yellow",
           HealthStatus.UNHEALTHY: "red"}


def health_table(items: list[PluginHealth]) -> Table:
    table = Table("plugin", "status", "runs", "ok", "failures", "restarts", "recent err",
                  "p95 ms", "queue", "workers", "breaker", "reasons")
    for item in items:
        colour = COLOURS[item.status]
        failures = ", ".join(f"{k} {v}" for k, v in sorted(item.failures.items())) or "-"
        p95 = item.recent.latency_ms.get("p95")
        cells = (item.plugin_id, item.status, item.runs, item.succeeded, failures,
                 item.restarts, f"{item.recent.error_rate:.0%}",
                 "-" if p95 is None else f"{p95:g}", item.queue_depth, len(item.workers),
                 item.breaker_state, "; ".join(item.reasons))
        # Literal text, never rich markup: ids, reasons and worker names come from outside.
        row = [Text(str(cell)) for cell in cells]
        row[1].stylize(colour)
        table.add_row(*row)
    return table


def cmd_health(args: argparse.Namespace) -> int:
    with PluginClient(Settings.from_env()) as client:
        def collect() -> list[PluginHealth]:
            result = client.health(args.plugin)
            return result if isinstance(result, list) else [result]

        if args.json:
            items = collect()
            payload = [item.model_dump(mode="json") for item in items]
            print(json.dumps(payload[0] if args.plugin else payload, indent=2))
            return 0
        console = Console(width=None if sys.stdout.isatty() else 220)
        if not args.watch:
            console.print(health_table(collect()))
            return 0
        with Live(health_table(collect()), console=console, refresh_per_second=1) as live:
            try:
                while True:
                    time.sleep(args.interval)
                    live.update(health_table(collect()))
            except KeyboardInterrupt:
                return 0


def cmd_check_health(args: argparse.Namespace) -> int:
    """Exit 0 when healthy enough for a liveness/readiness probe, else 1 with the reason."""
    settings = Settings.from_env()
    try:
        with PluginClient(settings) as client:
            client.redis.ping()
            if args.worker:
                workers = live_workers(client.redis, settings.keys,
                                       heartbeat_s=settings.worker_heartbeat_s)
                if args.worker not in workers:
                    print(f"worker {args.worker} has no recent heartbeat", file=sys.stderr)
                    return 1
            if args.plugin:
                health = client.health(args.plugin)
                assert isinstance(health, PluginHealth)
                if health.status is HealthStatus.UNHEALTHY:
                    print(f"{args.plugin} is unhealthy: {'; '.join(health.reasons)}",
                          file=sys.stderr)
                    return 1
    except (PluginPoolError, OSError, Exception) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print("ok")
    return 0
