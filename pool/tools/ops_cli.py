"""CLI commands for operator actions: disable, enable, drain, purge, cancel, audit.

Each prints one JSON object (what the action did) and is recorded in the audit log as
done by this login, from the CLI."""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pluginpool.tasks.audit import Actor
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings

CLI = "cli"


def _client() -> PluginClient:
    return PluginClient(Settings.from_env())


def _print(result: dict[str, Any]) -> int:
    print(json.dumps(result))
    return 0


def cmd_disable(args: argparse.Namespace) -> int:
    with _client() as client:
        return _print(client.disable(args.plugin, actor=Actor.local(CLI)))


def cmd_enable(args: argparse.Namespace) -> int:
    with _client() as client:
        return _print(client.enable(args.plugin, actor=Actor.local(CLI)))


def cmd_drain(args: argparse.Namespace) -> int:
    """Exit 0 once the queue is empty; 1 if jobs are still queued after --wait."""
    with _client() as client:
        result = client.drain(args.plugin, actor=Actor.local(CLI), wait_s=args.wait)
    _print(result)
    return 0 if result["drained"] or args.wait is None else 1


def cmd_purge(args: argparse.Namespace) -> int:
    with _client() as client:
        return _print(client.purge(args.plugin, actor=Actor.local(CLI)))


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client() as client:
        return _print(client.cancel(args.job, plugin_id=args.plugin, actor=Actor.local(CLI)))


def cmd_audit(args: argparse.Namespace) -> int:
    with _client() as client:
        entries = client.audit_log(limit=args.limit, target=args.target)
    if args.json:
        print(json.dumps([e.model_dump(mode="json") for e in entries], indent=2))
        return 0
    table = Table("at", "who", "role", "from", "action", "target", "outcome")
    for e in entries:
        at = datetime.datetime.fromtimestamp(e.at).strftime("%Y-%m-%d %H:%M:%S")
        outcome = "ok" if e.ok else f"refused: {e.error}"
        table.add_row(*(Text(str(v)) for v in (at, e.who, e.role, e.origin, e.action,
                                               e.target, outcome)))
    Console().print(table)
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("disable", help="refuse a plugin's new jobs; queued ones wait")
    p.add_argument("plugin")
    p.set_defaults(func=cmd_disable)

    p = sub.add_parser("enable", help="accept a disabled (or draining) plugin's jobs again")
    p.add_argument("plugin")
    p.set_defaults(func=cmd_enable)

    p = sub.add_parser("drain", help="refuse new jobs and let the queue finish")
    p.add_argument("plugin")
    p.add_argument("--wait", type=float, default=None, metavar="S",
                   help="wait up to S seconds for the queue to be empty (exit 1 if not)")
    p.set_defaults(func=cmd_drain)

    p = sub.add_parser("purge", help="remove a plugin's queued jobs (each ends cancelled)")
    p.add_argument("plugin")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("cancel", help="cancel a job: queued, it never runs; running, "
                                      "its run is killed")
    p.add_argument("job")
    p.add_argument("--plugin", default=None, help="the job's plugin (for the record)")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("audit", help="the operator actions log, newest first")
    p.add_argument("--limit", type=_at_least_one, default=50,
                   help="the newest N entries (default 50)")
    p.add_argument("--target", default=None, help="only actions on this plugin, job or id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)
