"""Per-job CPU breakdown from `python -m bench.overhead --profile DIR`.

Producer: cProfile files (`producer-<system>.prof`), inclusive time of the functions that
make up a submit and a wait, per job. Worker: py-spy raw stacks (`worker-<system>.txt`,
every process of the worker, 200 samples/s), the share of samples in which each step is on
the stack, in ms per job. Run: `python -m bench.profile_summary DIR JOBS`.
"""

from __future__ import annotations

import json
import pstats
import sys
from collections import Counter
from pathlib import Path

PRODUCER_STEPS = {
    "PluginClient.submit": ("client.py", "submit"),
    "  spec (cached)": ("client.py", "spec"),
    "  payload checks (_encode)": ("client.py", "_encode"),
    "  pause check (HGET; now in the publish)": ("pause.py", "pause_of"),
    "  breaker (view or acquire)": ("breaker_view.py", "admit"),
    "  breaker acquire (EVALSHA)": ("breaker.py", "acquire"),
    "  job status 'queued' (EVALSHA; now in the publish)": ("job_status.py", "set"),
    "  submit step for the publish (pause + 'queued')": ("submit_step.py", "for_job"),
    "  Celery send_task": ("base.py", "send_task"),
    "    kombu publish (publish.lua)": ("ready_index.py", "_put"),
    "Celery send_task (plain)": ("base.py", "send_task"),
    "wait for the result": ("result.py", "get"),
    "Job.result": ("jobs.py", "result"),
}

WORKER_STEPS = {
    "Celery trace (task + its bookkeeping)": "trace_task",
    "pluginpool task body": "_run_plugin_job",
    "  parse_job": "parse_job",
    "  cancel/pause check (before: 1 round trip)": "check_before_run",
    "  pre-run check + 'started' (1 round trip)": "start_job",
    "  spec lookup (cached)": "SpecCache.get",
    "  breaker gate (cached)": "_admit",
    "  the plugin run (in process)": "InProcessRunner.run",
    "  record_run (before: 1 round trip; now queued for the result's MULTI)": "record_run",
    "    usage event encoding": "EventEncoder.encode",
    "  run log (before: 1 round trip; now queued for the result's MULTI)": "keep_run",
    "job status hooks (before: started/succeeded; now retrying only)": "job_status_hooks",
    "result backend store (now + record, status, run log: 2 round trips)": "store_result",
    "  result MULTI (now)": "JobResultBackend._set",
    "Celery signals dispatch": "signal.py",
    "Celery task logging (success line)": "trace_filter",
    "task events (received/started/succeeded)": "send_event",
    "transport claim/ack (kombu + Lua)": "reliable_fetch",
    "idle wait (BLPOP/BRPOP, select)": "_brpop_read",
}


def producer(path: Path, jobs: int) -> dict[str, float]:
    stats = pstats.Stats(str(path))
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = stats.stats  # type: ignore[attr-defined]
    total = max(ct for (_, _, ct, _) in ((v[0], v[1], v[3], v[4]) for v in raw.values()))
    out = {"total CPU+wait ms per job": round(total * 1000 / jobs, 3)}
    for label, (file, func) in PRODUCER_STEPS.items():
        cum = sum(v[3] for (f, _, fn), v in raw.items() if f.endswith(file) and fn == func)
        if cum:
            out[label] = round(cum * 1000 / jobs, 3)
    return out


def worker(path: Path, jobs: int, rate_hz: int = 200) -> dict[str, float]:
    samples: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        for label, needle in WORKER_STEPS.items():
            if needle in stack:
                samples[label] += n
    per_job = 1000 / rate_hz / jobs
    out = {"all samples, ms per job (every process, idle included)": round(total * per_job, 3)}
    out.update({label: round(samples[label] * per_job, 3) for label in WORKER_STEPS
                if samples[label]})
    return out


def main() -> None:
    directory, jobs = Path(sys.argv[1]), int(sys.argv[2])
    result: dict[str, dict[str, float]] = {}
    for prof in sorted(directory.glob("producer-*.prof")):
        result[prof.stem] = producer(prof, jobs)
    for raw in sorted(directory.glob("worker-*.txt")):
        result[raw.stem] = worker(raw, jobs)
    print(json.dumps({
        "how": "python -m bench.overhead --jobs JOBS --profile DIR; "
               "python -m bench.profile_summary DIR JOBS",
        "jobs": jobs,
        "producer": "cProfile, inclusive wall time per job (a round trip is mostly waiting)",
        "worker": "py-spy --subprocesses at 200 Hz, non-idle samples per job, in ms",
        "profiles": result}, indent=2))


if __name__ == "__main__":
    main()
