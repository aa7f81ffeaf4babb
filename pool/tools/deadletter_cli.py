"""`pluginpool deadletter`: list, requeue and discard what the workers set aside."""

from __future__ import annotations

import argparse
import datetime
import json

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pluginpool.policy.errors import DeadLetterUsageError
from pluginpool.tasks.audit import Actor
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.deadletter import DeadLetterStore
from pluginpool.tasks.settings import Settings


def cmd_deadletter(args: argparse.Namespace) -> int:
    with PluginClient(Settings.from_env()) as client:
        store = DeadLetterStore(client.redis, client.settings.keys)
        if args.requeue:
            done = client.requeue_dead_letter(args.requeue, actor=Actor.local("cli"))
            print(f"requeued {done['id']} on {done['queue']}")
            return 0
        if args.discard is not None or args.all:
            if args.all:
                print(f"discarded {store.discard_all()} dead letters")
                return 0
            if not args.discard:
                raise DeadLetterUsageError("--discard needs an ID, or --all")
            client.discard_dead_letter(args.discard, actor=Actor.local("cli"))
            print(f"discarded {args.discard}")
            return 0
        entries = store.list(limit=args.limit)
        total = store.count()
    if args.json:
        print(json.dumps({"total": total, "entries": [e.summary() for e in entries]}, indent=2))
        return 0
    table = Table("id", "queue", "first seen", "deliveries", "reason",
                  title=f"{total} dead letters (newest first)")
    for entry in entries:
        seen = datetime.datetime.fromtimestamp(entry.first_seen).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(*(Text(str(value)) for value in (
            entry.id, entry.queue or "?", seen, entry.deliveries, entry.reason[:200])))
    Console().print(table)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("deadletter", help="list, requeue or discard dead-lettered messages")
    p.add_argument("--json", action="store_true", help="print JSON (summaries, no raw body)")
    p.add_argument("--limit", type=int, default=50, help="how many to list (default 50)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--requeue", metavar="ID",
                        help="put this message back on its queue, delivery count reset")
    action.add_argument("--discard", metavar="ID", nargs="?", const="",
                        help="delete this dead letter (or every one, with --all)")
    p.add_argument("--all", action="store_true", help="with --discard: delete every dead letter")
    p.set_defaults(func=cmd_deadletter)
