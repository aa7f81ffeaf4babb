"""`pluginpool job ID [--follow]` and `pluginpool submit --follow`: a job's status changes,
as they are pushed (tasks/job_status.py), one line each."""

from __future__ import annotations

import argparse
import json
import queue
import time
from datetime import datetime
from typing import Any

from pluginpool.policy.errors import JobWaitTimeoutError, PluginExecutionError, PluginPoolError
from pluginpool.pool.tools.cli_output import EXIT_JOB_FAILED, EXIT_OK
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.job_status import TERMINAL
from pluginpool.tasks.jobs import FallbackJob, Job
from pluginpool.tasks.settings import Settings

DETAIL_FIELDS = ("plugin_id", "worker", "attempt", "reason", "error_type")


def format_change(change: dict[str, Any]) -> str:
    at = datetime.fromtimestamp(float(change.get("at", time.time()))).strftime("%H:%M:%S.%f")
    details = " ".join(f"{name}={change[name]}" for name in DETAIL_FIELDS
                       if change.get(name) not in (None, ""))
    return f"{at[:-3]}  {change['status']:<10} {details}".rstrip()


def follow(job: Job | FallbackJob, *, as_json: bool, timeout_s: float) -> int:
    """Print each change until the job ends, then its outcome; the exit code says which."""
    changes: queue.Queue[dict[str, Any]] = queue.Queue()
    job.on_status_change(changes.put)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            change = changes.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise JobWaitTimeoutError(job.id, timeout_s=timeout_s) from None
        final = change["status"] in TERMINAL
        outcome: dict[str, Any] = {}
        if final:
            outcome = _outcome(job)
        print(json.dumps({**change, **outcome}) if as_json else format_change(change),
              flush=True)
        if final:
            if not as_json:
                print(json.dumps(outcome, indent=2), flush=True)
            return EXIT_OK if outcome.get("ok") else EXIT_JOB_FAILED


def _outcome(job: Job | FallbackJob) -> dict[str, Any]:
    try:
        value = job.result(timeout=0) if isinstance(job, FallbackJob) else job.stored_outcome()
    except PluginExecutionError as exc:
        return {"ok": False, "error": exc.info.model_dump(mode="json")}
    except PluginPoolError as exc:
        return {"ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}}
    return {"ok": True, "value": value}


def cmd_job(args: argparse.Namespace) -> int:
    as_json = bool(args.json or args.json_output)
    with PluginClient(Settings.from_env()) as client:
        job = client.job(args.job_id)
        if args.follow:
            return follow(job, as_json=as_json, timeout_s=args.timeout)
        history = client.job_watcher.store.history(args.job_id)
    if as_json:
        print(json.dumps(history))
    else:
        for change in history:
            print(format_change(change))
        if not history:
            print(f"no status recorded for job {args.job_id} (unknown, or expired)")
    return EXIT_OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser("job", help="a job's status changes, by its id (from any producer)")
    p.add_argument("job_id", help="the job's id, as submit printed it")
    p.add_argument("--follow", action="store_true",
                   help="print each change as it happens until the job ends; exit 0 if it "
                        "succeeded, 1 if it failed, 3 if --timeout passed first")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="with --follow: how long to wait for the job to end")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_job)
