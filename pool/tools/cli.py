"""The `pluginpool` command."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from pluginpool.policy.errors import JobWaitTimeoutError, PluginExecutionError, PluginPoolError
from pluginpool.pool.tools import fleet_cli, job_cli, ops_cli
from pluginpool.pool.tools.cli_output import (
    EXIT_BAD_INPUT,
    EXIT_CODES_HELP,
    EXIT_WAIT_TIMEOUT,
    apply_formatter,
    report_error,
    report_exception,
)
from pluginpool.pool.tools.deadletter_cli import add_parser as add_deadletter_parser
from pluginpool.tasks.audit import Actor
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.jobs import FallbackJob, Job
from pluginpool.tasks.settings import Settings, export_setting


def _client() -> PluginClient:
    return PluginClient(Settings.from_env())


def plain(*values: object) -> tuple[Text, ...]:
    """Table cells shown literally: plugin-supplied text (a version "[/x]", ":emoji:") is
    never interpreted as rich markup, which would garble it or crash the command."""
    return tuple(Text(str(value)) for value in values)


def cmd_worker(args: argparse.Namespace) -> int:
    from pluginpool.pool.worker import plan_worker, run_worker

    settings = Settings.from_env()
    plan = plan_worker(settings, plugins=args.plugins, concurrency=args.concurrency,
                       name=args.name, max_memory_per_child_mb=args.max_memory_per_child)
    print(f"pluginpool worker {plan.nodename}: queues {', '.join(plan.queues)}", file=sys.stderr)
    run_worker(settings, plan, loglevel=args.loglevel)
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    from pluginpool.pool.tools.flower import run_flower

    run_flower(Settings.from_env(), port=args.port, address=args.address)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    with _client() as client:
        specs = client.plugins()
    if args.json:
        print(json.dumps([spec.model_dump(mode="json") for spec in specs], indent=2))
        return 0
    table = Table("id", "version", "rev", "entrypoint", "timeout_ms", "memory_mb", "sandboxed")
    for spec in specs:
        limits = spec.resource_limits
        table.add_row(*plain(spec.id, spec.version, spec.revision, spec.entrypoint,
                             limits.timeout_ms, limits.max_memory_mb, spec.isolation.sandboxed))
    Console().print(table)
    return 0


def _outcome(job: Job | FallbackJob, timeout: float, *,
             count_timeouts: bool = False) -> dict[str, Any]:
    try:
        value = job.result(timeout=timeout)
        return {"job_id": job.id, "ok": True, "value": value, "meta": job.meta}
    except PluginExecutionError as exc:
        return {"job_id": job.id, "ok": False, "error": exc.info.model_dump(mode="json")}
    except JobWaitTimeoutError:
        if not count_timeouts:
            raise  # exit 3 (pool/tools/cli_output.py)
        return {"job_id": job.id, "ok": False, "timed_out": True}


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload) if args.payload is not None else None
    except json.JSONDecodeError as exc:
        report_error("InvalidPayloadError", f"--payload is not JSON: {exc}",
                     as_json=args.json_output)
        return EXIT_BAD_INPUT
    except RecursionError:  # the decoder recurses per level; the client bounds the depth
        report_error("PayloadTooDeepError",
                     "--payload is nested deeper than the decoder can read",
                     as_json=args.json_output)
        return EXIT_BAD_INPUT
    with _client() as client:
        if args.count == 1:
            job = client.submit(args.plugin, payload, instance_id=args.instance,
                                operation=args.operation)
            if args.follow:
                return job_cli.follow(job, as_json=args.json_output, timeout_s=args.timeout)
            out = _outcome(job, args.timeout) if args.wait else {"job_id": job.id}
            print(json.dumps(out))
            return 0 if out.get("ok", True) else 1
        return _submit_many(client, args, payload)


def _submit_many(client: PluginClient, args: argparse.Namespace, payload: Any) -> int:
    jobs: list[Job | FallbackJob] = []
    outcomes: list[dict[str, Any]] = []
    started = time.monotonic()
    with Progress(console=Console(stderr=True), transient=True) as progress:
        sent = progress.add_task("enqueue", total=args.count)
        for _ in range(args.count):
            jobs.append(client.submit(args.plugin, payload, instance_id=args.instance,
                                      operation=args.operation))
            progress.advance(sent)
        if args.wait:
            done = progress.add_task("wait", total=args.count)
            for job in jobs:
                outcomes.append(_outcome(job, args.timeout, count_timeouts=True))
                progress.advance(done)
    elapsed = time.monotonic() - started
    summary: dict[str, Any] = {
        "count": args.count, "enqueued": sum(not job.is_fallback for job in jobs),
        "fallbacks": sum(job.is_fallback for job in jobs), "elapsed_s": round(elapsed, 3),
        "jobs_per_s": round(args.count / elapsed, 1) if elapsed else None}
    if args.ids:
        summary["job_ids"] = [job.id for job in jobs]
    if args.wait:
        errors: dict[str, int] = {}
        for out in outcomes:
            if out.get("timed_out"):
                errors["wait_timed_out"] = errors.get("wait_timed_out", 0) + 1
            elif not out["ok"]:
                errors[out["error"]["type"]] = errors.get(out["error"]["type"], 0) + 1
        summary.update(succeeded=sum(o["ok"] for o in outcomes), failed=errors)
    print(json.dumps(summary))
    if summary.get("failed", {}).get("wait_timed_out"):
        return EXIT_WAIT_TIMEOUT
    return 0 if not summary.get("failed") else 1


def cmd_breaker(args: argparse.Namespace) -> int:
    with _client() as client:
        if args.reset:
            client.reset_breaker(args.plugin, actor=Actor.local("cli"))
        elif args.force_open:
            client.force_open_breaker(args.plugin, actor=Actor.local("cli"))
        status = client.breaker(args.plugin)
    if args.json:
        print(json.dumps(status.as_dict(), indent=2))
        return 0
    console = Console()
    wait = status.retry_after_ms
    console.print(Text.assemble((status.plugin_id, "bold"), f": {status.state}"
                                f"{' (forced)' if status.forced else ''} - "
                                f"{status.reason or 'no transitions'}"))
    console.print(f"window: {status.window_total} runs, {status.window_failed} failed "
                  f"({status.failure_rate:.0%}), {status.window_slow} slow")
    if status.state == "open":
        console.print("next trial: " + ("after a reset" if wait < 0 else f"in {wait} ms"))
    if status.state == "half_open":
        console.print(f"trials: {status.permits_left} permits left, "
                      f"{status.trial_successes} succeeded")
    table = Table("at", "from", "to", "reason")
    for event in status.history[:10]:
        at = time.strftime("%H:%M:%S", time.localtime(event["at_ms"] / 1000))
        table.add_row(*plain(at, event["from"], event["to"], event["reason"]))
    console.print(table)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pluginpool.pool.tools.demo import run_demo

    return run_demo(duration_s=args.duration, as_json=args.json,
                    examples=Path(args.examples) if args.examples else None,
                    reset=args.reset)


def cmd_ensure_redis(args: argparse.Namespace) -> int:
    from pluginpool.pool.tools.redis_bootstrap import ensure_redis

    settings = Settings.from_env()
    reachable = ensure_redis(settings.redis_url, run_dir=Path(args.run_dir))
    print(f"Redis: {reachable.url} ({reachable.how})", file=sys.stderr)
    print(reachable.url)
    return 0


def _lazy(module: str, name: str) -> Any:
    """A command whose module is imported only when it runs (keeps start-up fast)."""
    def run(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), name)(args))
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pluginpool", description=__doc__,
                                     epilog=EXIT_CODES_HELP)
    parser.add_argument("--version", action="version",
                        version=f"pluginpool {importlib.metadata.version('pluginpool')}")
    parser.add_argument("--redis-url", default=None, metavar="URL",
                        help="Redis for everything (registry, broker, results); overrides "
                             "PLUGINPOOL_REDIS_URL (default: PLUGINPOOL_REDIS_URL, else "
                             "redis://127.0.0.1:6379/0)")
    parser.add_argument("--json", dest="json_output", action="store_true",
                        help="errors (and `submit --follow`, `job`) as JSON; errors are JSON "
                             "anyway when stderr is not a terminal")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("worker", help="run a prefork worker for some or all plugins")
    p.add_argument("--plugins", default="all",
                   help="'all', or comma-separated plugin ids and fnmatch globs ('acme-*');"
                        " the worker follows the registry for them")
    p.add_argument("--concurrency", type=int, default=None,
                   help="pool processes (default: the number of CPUs)")
    p.add_argument("--name", default=None, help="node name, e.g. heavy@host1 (default: a "
                                                "generated one)")
    p.add_argument("--max-memory-per-child", type=int, default=None, metavar="MB",
                   help="replace a pool process that ends a job above this (default: the "
                        "largest max_memory_mb of its plugins + 128)")
    p.add_argument("--loglevel", default="INFO", help="Celery's log level")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("flower", help="run Flower against pluginpool's app")
    p.add_argument("--port", type=int, default=5555, help="HTTP port")
    p.add_argument("--address", default="127.0.0.1", help="address to listen on")
    p.set_defaults(func=cmd_flower)

    p = sub.add_parser("register", help="publish the plugins of a TOML manifest (with their"
                       " code when they name a `source`), or of installed entry points")
    p.add_argument("file", nargs="?", default=None, help="a TOML manifest")
    p.add_argument("--entry-points", nargs="*", default=None, metavar="NAME",
                   help="register plugins of installed distributions (all, or those named)")
    p.set_defaults(func=fleet_cli.cmd_register)
    fleet_cli.add_parsers(sub)

    p = sub.add_parser("plugins", help="list registered plugins")
    p.add_argument("--json", action="store_true", help="the specs as a JSON list")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("submit", help="enqueue jobs for a plugin", epilog=EXIT_CODES_HELP)
    p.add_argument("plugin", help="the plugin's id")
    p.add_argument("--payload", default=None, help="the job's payload, as JSON (default: null)")
    p.add_argument("--instance", default=None, help="an instance id (from PluginClient.load)")
    p.add_argument("--operation", default="run", help="one of the plugin's operations")
    waiting = p.add_mutually_exclusive_group()
    waiting.add_argument("--wait", action="store_true",
                         help="wait for the outcome and print it as JSON")
    waiting.add_argument("--follow", action="store_true",
                         help="print each status change (queued, started, retrying, "
                              "succeeded, failed) as it happens, then the outcome")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="with --wait or --follow: how long to wait (exit 3 after it)")
    p.add_argument("--count", type=int, default=1, metavar="N",
                   help="enqueue N jobs, with a progress bar and a summary")
    p.add_argument("--ids", action="store_true",
                   help="with --count: list the job ids in the summary")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("breaker", help="show (or override) a plugin's circuit breaker")
    p.add_argument("plugin", help="the plugin's id")
    p.add_argument("--json", action="store_true", help="the status as JSON")
    override = p.add_mutually_exclusive_group()
    override.add_argument("--reset", action="store_true", help="close it and clear its window")
    override.add_argument("--force-open", action="store_true", help="open it until a reset")
    p.set_defaults(func=cmd_breaker)

    p = sub.add_parser("health", help="per-plugin health (table, JSON, or watch)")
    p.add_argument("plugin", nargs="?", default=None, help="one plugin (default: all)")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, metavar="S",
                   help="with --watch: seconds between refreshes")
    p.set_defaults(func=_lazy("pluginpool.pool.tools.health_cli", "cmd_health"))

    p = sub.add_parser("check-health", help="exit 0 or 1, for liveness and readiness probes")
    p.add_argument("--worker", default=None, help="also require this worker's heartbeat")
    p.add_argument("--plugin", default=None, help="also require this plugin not unhealthy")
    p.set_defaults(func=_lazy("pluginpool.pool.tools.health_cli", "cmd_check_health"))

    p = sub.add_parser("aggregator", help="run the health aggregator and its HTTP API")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8008, help="HTTP port")
    p.set_defaults(func=_lazy("pluginpool.pool.aggregator.service", "cmd_aggregator"))

    p = sub.add_parser("demo", help="run the example plugins on this machine")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="stop after S seconds (default: run until Ctrl-C)")
    p.add_argument("--json", action="store_true", help="print one summary object at the end")
    p.add_argument("--examples", default=None,
                   help="examples directory (default: the repository's examples/)")
    p.add_argument("--reset", action="store_true",
                   help="first reset the example plugins' breakers (a previous run leaves "
                        "the misbehaving ones open)")
    p.set_defaults(func=cmd_demo)

    add_deadletter_parser(sub)
    ops_cli.add_parsers(sub)

    job_cli.add_parser(sub)

    p = sub.add_parser("ensure-redis", help="print a reachable Redis URL, starting one if needed")
    p.add_argument("--run-dir", default=".run",
                   help="where a Redis started here keeps its files")
    p.set_defaults(func=cmd_ensure_redis)
    apply_formatter(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.redis_url:
        export_setting("redis_url", args.redis_url)
    try:
        return int(args.func(args))
    except PluginPoolError as exc:  # exit codes: pool/tools/cli_output.py
        return report_exception(exc, as_json=args.json_output)


if __name__ == "__main__":
    sys.exit(main())
