"""Per-job overhead: pluginpool against plain Celery, jobs/s and Redis work per job.

Three systems, rounds alternating, all on a PRIVATE `redis-server` this script starts on a
free loopback port (nothing else talks to it, so its counters are ours; stopped by PID):
plain Celery with default settings, plain Celery with pluginpool's delivery settings
(acks late, prefetch 1, task events, task-sent events), and pluginpool (an unsandboxed
no-op plugin through `PluginClient`).

Each round: the producers (1, or `--producers N` in parallel, each its own process) warm
up, the server's statistics are reset, then every producer submits its share of `--jobs`
and waits for each result. Per job: commands from `INFO commandstats` (commands run inside
Lua scripts included, listed apart) and round trips from `total_reads_processed` (one read
event per request or pipeline a client sends; a blocking pop is one). A separate, smaller
round per system under MONITOR names which process sent each command (producer, worker
main process, pool child) and which script an EVALSHA ran.

Run: `python -m bench.overhead` (also in `make bench`); `--producers 8`, `--concurrency 4`.
`--profile DIR` writes cProfile files of one producer and py-spy of the worker instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import psutil
import redis

from bench.common import ROOT, median, plain_celery_worker, pluginpool_worker, write_result
from bench.many_plugins import private_redis
from pluginpool.pool.tools.processes import ManagedProcess
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec

SYSTEMS = ("plain_celery", "plain_celery_reliable", "pluginpool")
OPTIONAL_SYSTEMS = ("pluginpool_sandboxed",)  # only when named in --systems
NOOP = PluginSpec.model_validate({
    "id": "bench-noop", "name": "Bench no-op", "entrypoint": "pluginpool_examples.text:noop",
    "isolation": {"sandboxed": False}, "resource_limits": {"timeout_ms": 10_000}})
SANDBOXED_NOOP = PluginSpec.model_validate({
    "id": "bench-noop-sandboxed", "name": "Bench no-op, sandboxed",
    "entrypoint": "pluginpool_examples.text:noop",
    "isolation": {"sandboxed": True}, "resource_limits": {"timeout_ms": 10_000}})

WARMUP_JOBS = 20


def plugin_of(system: str) -> PluginSpec:
    return SANDBOXED_NOOP if system == "pluginpool_sandboxed" else NOOP


# -- the producer, run as its own process ------------------------------------------------

def produce(system: str, jobs: int, url: str, profile: str | None) -> None:
    """Warm up, say `ready`, wait for `go` on stdin, submit `jobs`, await each, say elapsed."""
    if system.startswith("pluginpool"):
        client = PluginClient(_settings(url))

        def one_round(n: int) -> None:
            submitted = [client.submit(plugin_of(system).id, {"i": i}) for i in range(n)]
            for job in submitted:
                job.result(timeout=300)
    else:
        from celery import Celery
        app = Celery("plain-producer", broker=url, backend=url, set_as_current=False)
        app.conf.update(task_serializer="json", accept_content=["json"])
        if system == "plain_celery_reliable":
            app.conf.update(task_send_sent_event=True)

        def one_round(n: int) -> None:
            results = [app.send_task("bench.noop", args=[{"i": i}], queue="bench.plain")
                       for i in range(n)]
            for result in results:
                result.get(timeout=300)
    one_round(WARMUP_JOBS)
    print("ready", flush=True)
    sys.stdin.readline()
    started, cpu = time.perf_counter(), time.process_time()
    if profile:
        import cProfile
        cProfile.runctx("one_round(jobs)", globals(), {"one_round": one_round, "jobs": jobs},
                        filename=profile)
    else:
        one_round(jobs)
    print(json.dumps({"elapsed_s": time.perf_counter() - started,
                      "cpu_s": time.process_time() - cpu}), flush=True)


def _settings(url: str) -> Settings:
    return Settings(_env_file=None, redis_url=url,  # type: ignore[call-arg]
                    plugin_paths=[str(ROOT / "examples")])


# -- counting --------------------------------------------------------------------------

def counters(store: redis.Redis) -> tuple[dict[str, int], int]:
    stats: dict[str, Any] = store.info("commandstats")  # type: ignore[assignment]
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    reads = int(store.info("stats")["total_reads_processed"])  # type: ignore[index]
    return calls, reads


def redis_cpu_s(store: redis.Redis) -> float:
    cpu: dict[str, Any] = store.info("cpu")  # type: ignore[assignment]
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def tree_cpu_s(pid: int) -> float:
    """CPU (user + sys) of a process and its children so far."""
    total = 0.0
    main = psutil.Process(pid)
    for proc in [main, *main.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def redis_usec(store: redis.Redis) -> dict[str, int]:
    """Microseconds Redis spent per command (a script's includes the commands it ran)."""
    stats: dict[str, Any] = store.info("commandstats")  # type: ignore[assignment]
    return {name.removeprefix("cmdstat_"): int(v["usec"]) for name, v in stats.items()}


def script_names() -> dict[str, str]:
    """SHA → script, for every Lua script pluginpool sends by EVALSHA."""
    from pluginpool.policy.breaker import LUA_SOURCE as BREAKER
    from pluginpool.pool.job_start import SHA as JOB_START
    from pluginpool.tasks import delivery_record as d
    from pluginpool.tasks.job_status import LUA_SOURCE as JOB_STATUS
    from pluginpool.tasks.result_store import STORE_SHA
    names = {hashlib.sha1(BREAKER.encode()).hexdigest(): "breaker.lua (acquire/record)",
             hashlib.sha1(JOB_STATUS.encode()).hexdigest(): "job_status.lua",
             JOB_START: "job_start.lua (pre-run check + started)",
             STORE_SHA: "store_result.lua (result + final status)"}
    baseline = os.environ.get("BENCH_BASELINE_CODE")
    if baseline:
        policy = Path(baseline) / "pluginpool" / "policy"
        source = "\n".join((policy / n).read_text() for n in ("outcome.lua", "breaker.lua"))
        names[hashlib.sha1(source.encode()).hexdigest()] = "breaker.lua (baseline)"
        old_status = (Path(baseline) / "pluginpool" / "tasks" / "job_status.lua").read_text()
        names[hashlib.sha1(old_status.encode()).hexdigest()] = "job_status.lua (baseline)"
    for name in ("CLAIM", "ACK", "DEAD_LETTER", "RESCUE", "PUBLISH", "INDEX"):
        script = getattr(d, name)
        names[script.sha] = f"{name.lower()}.lua (transport)"
    return names


def script_usec(store: redis.Redis, jobs: int) -> dict[str, float]:
    """Redis µs per job by command, each script apart (from a SLOWLOG that logged every
    command; a script's time includes the commands it ran, EXEC's those it queued)."""
    names = script_names()
    usec: Counter[str] = Counter()
    entries: list[dict[str, Any]] = store.slowlog_get(1_000_000)  # type: ignore[assignment]
    for entry in entries:
        words = entry["command"].split() if isinstance(entry["command"], bytes) else []
        name = words[0].decode().lower() if words else "?"
        if name == "evalsha" and len(words) > 1:
            name = "evalsha " + names.get(words[1].decode(), words[1].decode()[:10])
        usec[name] += int(entry["duration"])
    store.config_set("slowlog-log-slower-than", 10_000)
    store.slowlog_reset()
    return {k: round(v / jobs, 1) for k, v in usec.most_common(12)}


class Monitor:
    """MONITOR in a thread: every command with the client address that sent it."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._client = redis.Redis.from_url(url)
        self.lines: list[tuple[str, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        with self._client.monitor() as monitor:
            self._ready.set()
            for item in monitor.listen():
                if self._stop.is_set():
                    return
                self.lines.append((str(item["client_address"]) + ":" + str(item["client_port"])
                                   if item.get("client_type") != "lua" else "lua",
                                   str(item["command"]).split()))

    def stop(self) -> None:
        self._stop.set()
        redis.Redis.from_url(self._url).ping()  # one more line, so listen() returns
        self._thread.join(10)


def roles(producers: list[int], worker: ManagedProcess, port: int) -> dict[str, str]:
    """Client port → role, from the sockets of the producers and the worker's processes."""
    procs: dict[int, str] = {pid: "producer" for pid in producers}
    main = psutil.Process(worker.pid)
    for child in main.children(recursive=True):
        procs[child.pid] = "worker pool child"
    # The launched process may exec or fork the Celery main process: the one with children
    # that are pool processes is "worker main"; the rest of the tree is named by depth.
    procs[worker.pid] = "worker main"
    for proc in main.children(recursive=True):
        if proc.children():
            procs[proc.pid] = "worker main"
    ports: dict[str, str] = {}
    for pid, role in procs.items():
        try:
            for conn in psutil.Process(pid).net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port == port:
                    ports[f"127.0.0.1:{conn.laddr.port}"] = role
        except psutil.Error:
            continue
    return ports


def attribute(lines: list[tuple[str, list[str]]], ports: dict[str, str], jobs: int,
              shas: dict[str, str]) -> dict[str, dict[str, float]]:
    by_role: dict[str, Counter[str]] = defaultdict(Counter)
    for client, words in lines:
        if not words:
            continue
        name = words[0].strip('"').lower()
        if name == "evalsha" and len(words) > 1:
            sha = words[1].strip('"')
            name = f"evalsha {shas.get(sha, sha[:10])}"
        role = "inside Lua scripts" if client == "lua" else ports.get(client, "other")
        by_role[role][name] += 1
    return {role: {cmd: round(n / jobs, 2) for cmd, n in counts.most_common()}
            for role, counts in by_role.items()}


# -- one round -------------------------------------------------------------------------

def code_env(system: str, env: dict[str, str]) -> dict[str, str]:
    """`pluginpool_baseline` runs the code found under BENCH_BASELINE_CODE (a directory
    holding pluginpool/{tasks,pool,policy}): an older revision, measured in the same run."""
    if system != "pluginpool_baseline":
        return env
    return {**env, "PYTHONPATH": os.pathsep.join(
        filter(None, [env["BENCH_BASELINE_CODE"], env.get("PYTHONPATH")]))}


def start_worker(system: str, client: PluginClient, env: dict[str, str], run_dir: Path,
                 concurrency: int) -> ManagedProcess:
    node = f"bench-{system}-{time.monotonic_ns()}@localhost"
    env = code_env(system, env)
    if system.startswith("pluginpool"):
        return pluginpool_worker(client, env, run_dir, plugins=plugin_of(system).id,
                                 concurrency=concurrency, node=node)
    worker_env = {**env, "BENCH_PLAIN_RELIABLE": "1" if "reliable" in system else "0"}
    return plain_celery_worker(client, worker_env, run_dir, concurrency=concurrency,
                               node=node)


def start_producers(system: str, url: str, jobs: int, count: int,
                    profile_dir: Path | None) -> list[subprocess.Popen[str]]:
    procs = []
    env = code_env(system, dict(os.environ))
    for index in range(count):
        argv = [sys.executable, "-m", "bench.overhead", "--produce", system, "--jobs",
                str(jobs // count), "--url", url]
        if profile_dir is not None and index == 0:
            argv += ["--profile-to", str(profile_dir / f"producer-{system}.prof")]
        procs.append(subprocess.Popen(argv, cwd=str(ROOT), stdin=subprocess.PIPE, env=env,
                                      stdout=subprocess.PIPE, text=True))
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"producer did not start ({system})")
    return procs


def run_round(system: str, *, url: str, client: PluginClient, env: dict[str, str],
              run_dir: Path, jobs: int, producers: int, concurrency: int,
              monitor: bool = False, profile_dir: Path | None = None) -> dict[str, Any]:
    store = redis.Redis.from_url(url)
    worker = start_worker(system, client, env, run_dir, concurrency)
    spy: subprocess.Popen[bytes] | None = None
    try:
        procs = start_producers(system, url, jobs, producers, profile_dir)
        time.sleep(1.0)  # let the warm-up's trailing events and acks settle
        watcher = Monitor(url) if monitor else None
        ports = roles([p.pid for p in procs], worker, store.connection_pool.connection_kwargs[
            "port"]) if monitor else {}
        if profile_dir is not None:
            spy = _py_spy(worker, profile_dir / f"worker-{system}")
        if monitor:  # every command's duration, to cost each Lua script apart
            store.config_set("slowlog-log-slower-than", 0)
            store.config_set("slowlog-max-len", 1_000_000)
            store.slowlog_reset()
        store.config_resetstat()
        cpu_before = redis_cpu_s(store)
        worker_cpu_before = tree_cpu_s(worker.pid)
        started = time.perf_counter()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        producer_cpu = 0.0
        for proc in procs:
            out, _ = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise SystemExit(f"producer failed ({system}): {out}")
            producer_cpu += float(json.loads(out.strip().splitlines()[-1])["cpu_s"])
        elapsed = time.perf_counter() - started
        worker_cpu = tree_cpu_s(worker.pid) - worker_cpu_before
        calls, reads = counters(store)
        usec = redis_usec(store)
        cpu_s = redis_cpu_s(store) - cpu_before
        if watcher is not None:
            watcher.stop()
        done = producers * (jobs // producers)
        slow = script_usec(store, done) if monitor else {}
        result: dict[str, Any] = {"jobs_per_s": done / elapsed, "calls": calls, "reads": reads,
                                  "jobs": done, "elapsed_s": elapsed, "usec": usec,
                                  "redis_cpu_s": cpu_s, "producer_cpu_s": producer_cpu,
                                  "worker_cpu_s": worker_cpu}
        if watcher is not None:
            result["by_process"] = attribute(watcher.lines, ports, done, script_names())
            result["redis_usec_per_job_by_script"] = slow
        idle_before = counters(store)
        time.sleep(2.0)
        idle_after = counters(store)
        result["idle_per_s"] = {"commands": (sum(idle_after[0].values())
                                             - sum(idle_before[0].values())) / 2.0,
                                "round_trips": (idle_after[1] - idle_before[1]) / 2.0}
        return result
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT only
            spy.wait(60)
        worker.stop()


def _py_spy(worker: ManagedProcess, out: Path) -> subprocess.Popen[bytes]:
    spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(spy), "record", "--pid", str(worker.pid), "--subprocesses",
                             "--format", "raw", "--rate", "200", "--nonblocking",
                             "--output", str(out) + ".txt"],
                            stdout=subprocess.DEVNULL, stderr=open(str(out) + ".log", "wb"))


# -- the benchmark ---------------------------------------------------------------------

def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    jobs = sum(r["jobs"] for r in rounds)
    calls: Counter[str] = Counter()
    usec: Counter[str] = Counter()
    for r in rounds:
        calls.update(r["calls"])
        usec.update(r["usec"])
    return {
        "jobs_per_s_median": round(median([r["jobs_per_s"] for r in rounds]), 1),
        "jobs_per_s_all": [round(r["jobs_per_s"], 1) for r in rounds],
        "round_trips_per_job": round(sum(r["reads"] for r in rounds) / jobs, 2),
        "commands_per_job": round(sum(calls.values()) / jobs, 2),
        "commands_per_job_by_name": {k: round(v / jobs, 2) for k, v in calls.most_common()},
        "producer_cpu_us_per_job": round(
            sum(r["producer_cpu_s"] for r in rounds) * 1e6 / jobs, 1),
        "worker_cpu_us_per_job (all its processes)": round(
            sum(r["worker_cpu_s"] for r in rounds) * 1e6 / jobs, 1),
        "redis_cpu_us_per_job (process CPU, user + sys)": round(
            sum(r["redis_cpu_s"] for r in rounds) * 1e6 / jobs, 1),
        "redis_cpu_us_per_job_by_command (scripts include their commands)": {
            k: round(v / jobs, 1) for k, v in usec.most_common(8)},
        "idle_per_s": rounds[-1]["idle_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--producers", type=int, default=1)
    parser.add_argument("--attribute-jobs", type=int, default=300,
                        help="jobs of the MONITOR round per system (0: none)")
    parser.add_argument("--profile", type=Path, help="write profiles here instead")
    parser.add_argument("--name", default="overhead", help="results file name")
    parser.add_argument("--systems", help="comma-separated subset of the systems (a quick "
                        "look while developing; ratios need all three)")
    parser.add_argument("--produce", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", help=argparse.SUPPRESS)
    args = parser.parse_args()
    systems = SYSTEMS + (("pluginpool_baseline",) if os.environ.get("BENCH_BASELINE_CODE")
                         else ())
    if args.systems:
        systems = tuple(name for name in systems + OPTIONAL_SYSTEMS
                        if name in args.systems.split(","))
    if args.produce:
        produce(args.produce, args.jobs, args.url, args.profile_to)
        return

    run_dir = Path(tempfile.mkdtemp(prefix="pluginpool-overhead-"))
    server, url = private_redis(run_dir)
    try:
        client = PluginClient(_settings(url))
        client.register(NOOP)
        client.register(SANDBOXED_NOOP)
        env = {**os.environ, "PLUGINPOOL_REDIS_URL": url, "BENCH_REDIS_URL": url,
               "PLUGINPOOL_PLUGIN_PATHS": json.dumps([str(ROOT / "examples")]),
               "PYTHONPATH": os.pathsep.join(
                   filter(None, [os.environ.get("PYTHONPATH"), str(ROOT / "bench")]))}
        common = {"url": url, "client": client, "env": env, "run_dir": run_dir,
                  "producers": args.producers, "concurrency": args.concurrency}
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            for system in systems:
                run_round(system, jobs=args.jobs, profile_dir=args.profile, **common)
            print(f"profiles in {args.profile}")
            return
        rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
        for _ in range(args.rounds):
            for system in systems:
                rounds[system].append(run_round(system, jobs=args.jobs, **common))
        by_process, by_script = {}, {}
        if args.attribute_jobs:
            for system in systems:
                attributed = run_round(system, jobs=args.attribute_jobs, monitor=True,
                                       **common)
                by_process[system] = attributed["by_process"]
                by_script[system] = attributed["redis_usec_per_job_by_script"]
        client.close()
    finally:
        server.stop()
    figures = {system: summarise(rs) for system, rs in rounds.items()}
    if not set(SYSTEMS) <= set(figures):
        print(json.dumps({"systems": figures, "by_process": by_process,
                          "by_script": by_script}, indent=1))
        return
    pp, plain, reliable = (figures[s] for s in ("pluginpool", "plain_celery",
                                                "plain_celery_reliable"))
    write_result(args.name, {
        "benchmark": "no-op job, each producer enqueues its share then waits for each result",
        "redis": "private redis-server, counters reset before each round",
        "jobs_per_round": args.jobs, "rounds": args.rounds, "producers": args.producers,
        "worker_concurrency": args.concurrency,
        "systems": figures,
        "ratio_pluginpool_vs_plain_celery": round(
            pp["jobs_per_s_median"] / plain["jobs_per_s_median"], 3),
        "ratio_pluginpool_vs_plain_celery_reliable": round(
            pp["jobs_per_s_median"] / reliable["jobs_per_s_median"], 3),
        "extra_round_trips_per_job_vs_reliable": round(
            pp["round_trips_per_job"] - reliable["round_trips_per_job"], 2),
        **({"ratio_pluginpool_baseline_vs_plain_celery_reliable": round(
            figures["pluginpool_baseline"]["jobs_per_s_median"]
            / reliable["jobs_per_s_median"], 3),
            "extra_round_trips_per_job_baseline_vs_reliable": round(
                figures["pluginpool_baseline"]["round_trips_per_job"]
                - reliable["round_trips_per_job"], 2)}
           if "pluginpool_baseline" in figures else {}),
        "commands_per_job_by_process (MONITOR round)": by_process,
        "redis_usec_per_job_by_script (MONITOR round, SLOWLOG of every command)": by_script,
    })


if __name__ == "__main__":
    main()
