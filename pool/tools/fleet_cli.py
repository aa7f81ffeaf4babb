"""CLI commands for a live fleet: register (manifest or entry points), unregister,
revisions, rollback, discover."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pluginpool.pool.tools.ops_cli import CLI
from pluginpool.tasks.audit import Actor
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings


def _client() -> PluginClient:
    return PluginClient(Settings.from_env())


def cmd_register(args: argparse.Namespace) -> int:
    """`register FILE`, or `register --entry-points [NAME...]`."""
    if (args.file is None) == (args.entry_points is None):
        print(json.dumps({"error": "usage", "message": "give a manifest FILE or"
                          " --entry-points [NAME...], not both"}), file=sys.stderr)
        return 2
    with _client() as client:
        if args.entry_points is not None:
            published = client.register_entry_points(args.entry_points or None)
        else:
            published = client.register(Path(args.file))
    for spec in published:
        code = f", code {spec.artifact.sha256[:12]}" if spec.artifact else ""
        print(f"registered {spec.id} {spec.version} (revision {spec.revision}{code})")
    return 0


def cmd_unregister(args: argparse.Namespace) -> int:
    with _client() as client:
        failed = client.unregister(args.plugin, actor=Actor.local(CLI))
    print(f"unregistered {args.plugin}; {failed} queued job(s) failed with a dependency error")
    return 0


def cmd_revisions(args: argparse.Namespace) -> int:
    with _client() as client:
        records = client.revisions(args.plugin)
        current = {spec.id: spec.revision for spec in client.plugins()}.get(args.plugin)
    if args.json:
        print(json.dumps([{**r.model_dump(mode="json"), "current": r.revision == current
                           and r.action != "unregister"} for r in records], indent=2))
        return 0
    table = Table("rev", "version", "action", "source sha256", "when", "by")
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.at)) if r.at else "?"
        action = r.action + (f" to {r.restored_revision}" if r.restored_revision else "")
        mark = " *" if r.revision == current and r.action != "unregister" else ""
        table.add_row(Text(f"{r.revision}{mark}"), Text(r.version), Text(action),
                      Text((r.source_sha256 or "-")[:16]), Text(when), Text(r.by or "?"))
    Console().print(table)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    with _client() as client:
        spec = client.rollback(args.plugin, to=args.to, actor=Actor.local(CLI))
    print(f"rolled back {spec.id}: revision {spec.revision} is now current"
          f" (version {spec.version})")
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    with _client() as client:
        found = client.discover()
    if args.json:
        print(json.dumps([plugin.as_dict() for plugin in found], indent=2))
        return 0
    table = Table("id", "version", "entrypoint", "distribution", "manifest")
    for plugin in found:
        table.add_row(Text(plugin.spec.id), Text(plugin.spec.version),
                      Text(plugin.spec.entrypoint),
                      Text(f"{plugin.distribution} {plugin.distribution_version}"),
                      Text("pluginpool.toml" if plugin.manifest_file else "defaults"))
    Console().print(table)
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("unregister", help="remove a plugin; its queued jobs fail, typed")
    p.add_argument("plugin", help="the plugin's id")
    p.set_defaults(func=cmd_unregister)

    p = sub.add_parser("revisions", help="a plugin's revisions: version, source hash, "
                                          "when and by whom registered")
    p.add_argument("plugin", help="the plugin's id")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_revisions)

    p = sub.add_parser("rollback", help="make an earlier revision current (as a new one)")
    p.add_argument("plugin", help="the plugin's id")
    p.add_argument("--to", type=int, default=None, metavar="REVISION",
                   help="the revision whose content to restore (default: the previous one)")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("discover", help="plugins declared by installed distributions")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_discover)
