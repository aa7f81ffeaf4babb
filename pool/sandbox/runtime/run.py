"""One run's process: forked from the zygote, narrowed further, the operation, one result.

Nothing here returns: the process ends with os._exit, whatever the plugin does.

Every page a run writes after the fork is a copy-on-write fault (about 2 µs each here), and
so is every page its zygote writes while preparing the next one. So the zygote builds what
all its runs share once (`Runs`: the Landlock layer, the rlimits, the Started frame's
layers, the ctx), and per run it only reads the Spawn frame's bytes and forks: the run
decodes its own Spawn, fills in the ctx's three per-run fields and applies the rest.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import stat
import sys
import time
from _json import encode_basestring_ascii, make_encoder
from json import JSONEncoder

from . import channel, landlock, limits, logs, seccomp
from .audit import AuditPolicy
from .classify import error_of
from .context import ChannelStorage, SandboxContext
from .libc import open_libc
from .messages import (
    RESOURCE,
    RUNTIME,
    Result,
    RunError,
    Spawn,
    ZygoteConfig,
    forked_frame,
    result_frame,
    started_frame,
    started_prefix,
)
from .plugin import LoadedPlugin, LoadError
from .records import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

_libc = open_libc()

CONTROL_FD = 3
"""The zygote's control socket: a run inherits it, says Forked on it first thing (so the
zygote touches nothing between the fork and the run's exit), then replaces it."""
CHANNEL_FD = 3
"""The run's channel is moved here (over the zygote's control socket, which the run must
not keep), so the seccomp filter that protects it can be compiled once."""
PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
RESET_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                 signal.SIGALRM, signal.SIGCHLD)
"""Reset to their defaults once, in the set-up zygote (runs inherit them): a run starts
with default signal dispositions whatever the setup installed."""
BAD_SPAWN_EXIT = 4
"""A run's exit code when it fails before it has its channel (a Spawn that is not one, a
zygote gone before the run's death signal was armed): the pool child sees the zygote
report an exit instead of Forked."""
_prctl = _libc.prctl
"""Called with small ints only (as C ints: no argument converters run in the run)."""
_SIGKILL = int(signal.SIGKILL)
_cpu_s = time.process_time
"""CPU of the whole process, user and system: the same kernel figure as getrusage's and
wait4's, without building a struct per reading."""
_perf = time.perf_counter
_c_encode = make_encoder(  # what JSONEncoder(allow_nan=False).encode builds on every call
    {}, JSONEncoder().default, encode_basestring_ascii, None, ": ", ", ", False, False, False)


def _encode_result(value: Any) -> str:
    """json.dumps(value, allow_nan=False), with an encoder built once in the zygote (the
    cycle markers it keeps are the run's own copy: one value per process)."""
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    return "".join(_c_encode(value, 0))


def reset_signals() -> None:
    """In the zygote after the setup: every run starts from default dispositions."""
    for signum in RESET_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)


DEV_NULL = os.makedev(1, 3)
_fd_bound = [2**31 - 1]
"""Past any descriptor the zygote or a run can hold: RLIMIT_NOFILE's hard limit before the
setup (note_fd_bound). A bound, not 2**31: without close_range (older kernels, some
container profiles) CPython closes every number up to it one by one."""


def note_fd_bound() -> None:
    """In the zygote after its own limits, before any plugin code."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if 0 < hard < _fd_bound[0]:
        _fd_bound[0] = hard


_stdio: list[tuple[int, int] | None] = [None, None, None]
"""What descriptors 0-2 are in the zygote when it starts: /dev/null, and the pipes of its
stdout and stderr that the pool child reads (their device and inode)."""


def note_stdio() -> None:
    """In the zygote, before any plugin code: remember what 0, 1 and 2 are."""
    for fd in (0, 1, 2):
        try:
            info = os.fstat(fd)
        except OSError:
            continue
        if fd == 0 and not (stat.S_ISCHR(info.st_mode) and info.st_rdev == DEV_NULL):
            continue
        _stdio[fd] = (info.st_dev, info.st_ino)


def _only_own_stdio() -> None:
    """Close any of fds 0-2 that is not what it was when the zygote started: a setup that
    put a copy of the control socket there would otherwise let every run write frames the
    pool child takes for the zygote's. Three fstats when nothing is wrong."""
    for fd in (0, 1, 2):
        try:
            info = os.fstat(fd)
        except OSError:
            continue
        if _stdio[fd] != (info.st_dev, info.st_ino):
            os.close(fd)


def _isolate(run_fd: int, forked: bytes, zygote_pid: int) -> None:
    """Own session, dies with its zygote, says Forked on the zygote's control socket and
    replaces that socket with its channel (its working directory, environment and signal
    dispositions were set by the zygote before the fork). Forked goes out this late so
    that the pool child, woken by it, usually finds Started already sent."""
    os.setsid()
    _prctl(PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
    if os.getppid() != zygote_pid:  # the zygote died before the death signal was armed
        os._exit(BAD_SPAWN_EXIT)
    _only_own_stdio()
    channel.send_frame(CONTROL_FD, forked)
    os.dup2(run_fd, CHANNEL_FD, inheritable=False)


RunLayer = tuple[int, dict[str, object]]
"""A run's Landlock ruleset (not enforced) and what it reports."""

LimitsKey = tuple[str, int, int, int, int]
"""(workspace, cpu_backstop_s, max_memory_mb, max_storage_kb, the zygote's virtual size):
what a run's lock-down depends on."""


@record
class Prepared:
    """A run's lock-down, worked out before it is applied: the run itself only applies it."""

    key: LimitsKey
    ruleset_fd: int | None
    seccomp: seccomp.Prepared | None
    rlimits: limits.RunLimits
    started: bytes
    """The Started frame up to its CPU figure (messages.started_prefix)."""


def run_layer(config: ZygoteConfig, workspace: str) -> RunLayer | None:
    """The Landlock layer of a run in `workspace`: writes only there, no signals to the
    zygote (None without Landlock)."""
    if not config.landlock_abi:
        return None
    return landlock.build_ruleset(
        read_paths=None, write_paths=(workspace, os.devnull),
        tcp_ports=landlock_ports(config.network_hosts), abi=config.landlock_abi)


def prepare(config: ZygoteConfig, key: LimitsKey, run_filter: seccomp.Prepared | None,
            layer: RunLayer | None) -> Prepared:
    """A run's rlimits, the layers it reports and its Landlock ruleset (`layer`, built
    but not enforced)."""
    _workspace, cpu_backstop_s, max_memory_mb, max_storage_kb, vms_bytes = key
    fd, info = layer if layer is not None else (None, None)
    rlimits, rlimit_layer = limits.plan_run(
        vms_bytes=vms_bytes, max_memory_mb=max_memory_mb, max_storage_kb=max_storage_kb,
        cpu_backstop_s=cpu_backstop_s)
    layers: dict[str, Any] = {
        "process": "fork", "zygote": True, "rlimits": rlimit_layer,
        "landlock": info or False,
        "seccomp": {"processes": not config.allow_processes,
                    "network": not config.network_hosts} if run_filter is not None else False,
        "audit_hook": True}
    return Prepared(key=key, ruleset_fd=fd, seccomp=run_filter, rlimits=rlimits,
                    started=started_prefix(layers))


def enter_workspace(workspace: str) -> None:
    """The working directory and environment a run in `workspace` starts with."""
    os.chdir(workspace)
    if os.environ.get("HOME") != workspace:
        os.environ["HOME"] = os.environ["TMPDIR"] = workspace
        tempfile = sys.modules.get("tempfile")  # not imported here: it seeds random at fork
        if tempfile is not None:
            tempfile.tempdir = workspace  # type: ignore[attr-defined]


class Runs:
    """What every run of one zygote shares, built in the zygote once after the setup: the
    run workspace entered, the audit policy narrowed to it, the ctx (a run fills in its job,
    attempt and operation), its Landlock layer, and the rest of its lock-down for the
    zygote's current size (`refresh`)."""

    def __init__(self, config: ZygoteConfig, plugin: LoadedPlugin, policy: AuditPolicy,
                 run_filter: seccomp.Prepared | None) -> None:
        self.config = config
        self.plugin = plugin
        self.policy = policy
        self.run_filter = run_filter
        self.zygote_pid = os.getpid()  # built in the zygote: a run's parent
        self.workspace = config.run_workspace
        self.layer: RunLayer | None = None
        self.prepared: Prepared | None = None
        self.ctx: SandboxContext | None = None
        policy.allow_processes = config.allow_processes
        if self.workspace:
            self.layer = run_layer(config, self.workspace)
            enter_workspace(self.workspace)
            policy.narrow(workspace=self.workspace)
            self.ctx = new_ctx(config, policy, self.workspace)

    def refresh(self, vms_bytes: int) -> None:
        """In the zygote before a fork: the shared lock-down for its size now (rebuilt only
        when its size changed)."""
        config = self.config
        if not self.workspace or not config.run_cpu_backstop_s or (
                self.prepared is not None and self.prepared.key[4] == vms_bytes):
            return
        self.prepared = prepare(config, (self.workspace, config.run_cpu_backstop_s,
                                         config.max_memory_mb, config.max_storage_kb,
                                         vms_bytes), self.run_filter, self.layer)


def new_ctx(config: ZygoteConfig, policy: AuditPolicy, workspace: str) -> SandboxContext:
    return SandboxContext(
        plugin_id=config.plugin_id, job_id=None, instance_id=config.instance_id, attempt=0,
        operation=None, limits=config.limits, permissions=config.permissions,
        initial_data=config.initial_data, workspace=workspace,
        storage=ChannelStorage(CHANNEL_FD, policy))


def landlock_ports(entries: list[str]) -> list[int] | None:
    """TCP ports a Landlock layer allows: None (unrestricted) when a host has any port."""
    from .audit import parse_hosts
    hosts = parse_hosts(entries)
    if any(ports is None for ports in hosts.values()):
        return None
    return sorted({port for ports in hosts.values() if ports for port in ports})


def _encoded(value: Any, max_bytes: int) -> bytes | RunError:
    """The value as JSON, encoded once, or why it cannot be the result."""
    try:
        data = _encode_result(value).encode()
    except (TypeError, ValueError) as exc:
        return RunError(RUNTIME, f"result is not JSON-serialisable: {exc}",
                        {"result_type": type(value).__name__})
    if len(data) > max_bytes:
        return RunError(RESOURCE, "result is larger than the result limit",
                        {"limit": "max_result_bytes", "limit_value": max_bytes,
                         "observed": len(data)})
    return data


def _spawn_of(body: bytes) -> Spawn:
    """The run's Spawn frame, decoded in the run (the zygote only forwards its bytes)."""
    frame = channel.loads(body)
    if not isinstance(frame, dict) or frame.pop("op", None) != Spawn.op:
        raise TypeError("the frame is not a spawn")
    return Spawn(**frame)


def _own_lock_down(runs: Runs, spawn: Spawn, key: LimitsKey) -> tuple[Prepared, SandboxContext]:
    """A run whose Spawn differs from what its zygote prepared (another workspace, other
    limits, a zygote that has not prepared any): it works out its own lock-down."""
    config, policy = runs.config, runs.policy
    workspace = spawn.workspace
    layer = runs.layer if workspace == runs.workspace else run_layer(config, workspace)
    if workspace != runs.workspace or runs.ctx is None:
        enter_workspace(workspace)
        policy.narrow(workspace=workspace)
        ctx = new_ctx(config, policy, workspace)
    else:
        ctx = runs.ctx
    return prepare(config, key, runs.run_filter, layer), ctx


REHEARSALS = 16
"""How often the zygote rehearses a run's pure steps before its first fork: past CPython
3.11's warm-up (a function is rewritten into its quickened form after 8 calls, each call
until then writing to its code object) and its specialisation of the rehearsed lines."""


def rehearse(runs: Runs, times: int = REHEARSALS) -> None:
    """In the zygote, once, after its setup: the steps of a run that change nothing outside
    this process (decoding a Spawn, the frames it sends, its result's encoding, a ctypes
    call, filling in the ctx), done `times` times so that the interpreter has warmed them
    up: each run then writes less of the zygote's memory, and every page written after the
    fork is a copy-on-write fault
    (`bench.sandbox_cost 500 --rounds 6 --ab`, three A/Bs: 18 to 21 faults fewer of 368 a
    no-op run, zygote and run together; 0.06 to 0.19 ms of CPU). The frames go to a
    pipe of its own, read back and closed; the ctx is left as it was. Whatever fails here
    (a setup may have broken what these steps use) only leaves the runs colder: the runs'
    own failures are reported by the runs."""
    with contextlib.suppress(BaseException):  # an optimisation only; see above
        _rehearse(runs, times)


def _rehearse(runs: Runs, times: int) -> None:
    config = runs.config
    spawn = Spawn(job_id="rehearsal", operation=next(iter(runs.plugin.operations), "run"),
                  payload={"rehearsal": [1, "a"]}, attempt=1, workspace=runs.workspace or "",
                  cpu_backstop_s=int(config.run_cpu_backstop_s or 0),
                  max_memory_mb=config.max_memory_mb, max_storage_kb=config.max_storage_kb)
    body = channel.body_of(spawn)
    prepared, ctx = runs.prepared, runs.ctx
    saved = (ctx.job_id, ctx.attempt, ctx.operation) if ctx is not None else None
    try:
        read_end, write_end = os.pipe()
    except OSError:  # out of descriptors after the setup: runs just start colder
        return
    try:
        for _ in range(times):
            decoded = _spawn_of(body)
            if ctx is not None:
                ctx.job_id, ctx.attempt, ctx.operation = (
                    decoded.job_id, decoded.attempt, decoded.operation)
            _prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)  # a ctypes call, as a run's first one
            channel.send_frame(write_end, forked_frame(os.getpid(), 0))
            if prepared is not None:
                channel.send_frame(write_end, started_frame(prepared.started, _cpu_s()))
            value = _encoded(decoded.payload, config.max_result_bytes)
            if isinstance(value, bytes):
                channel.send_frame(write_end, result_frame(
                    value, network_requests=0, cpu_s=_cpu_s() - _cpu_s(),
                    wall_s=_perf() - _perf()))
            os.read(read_end, 65536)
    finally:
        if ctx is not None and saved is not None:
            ctx.job_id, ctx.attempt, ctx.operation = saved
        os.close(read_end)
        os.close(write_end)


def run_child(runs: Runs, body: bytes, run_fd: int, rss_bytes: int,
              vms_bytes: int) -> NoReturn:
    """Decode the Spawn, narrow (saying Forked on the way), call the operation, send one
    Result frame, exit (no interpreter teardown)."""
    try:
        spawn = _spawn_of(body)
    except BaseException:  # without Forked: the pool child reports the sandbox broken
        os._exit(BAD_SPAWN_EXIT)
    config, policy = runs.config, runs.policy
    failed: Result | None = None
    value_json = b"null"
    spent = (0.0, 0.0)
    channel_ready = False
    try:
        key = (spawn.workspace, spawn.cpu_backstop_s, spawn.max_memory_mb,
               spawn.max_storage_kb, vms_bytes)
        prepared, ctx = runs.prepared, runs.ctx
        if prepared is None or ctx is None or prepared.key != key:
            prepared, ctx = _own_lock_down(runs, spawn, key)
        ctx.job_id, ctx.attempt, ctx.operation = spawn.job_id, spawn.attempt, spawn.operation
        _isolate(run_fd, forked_frame(os.getpid(), rss_bytes), runs.zygote_pid)
        channel_ready = True  # from here on a failure is reported on the run's channel
        if prepared.ruleset_fd is not None:
            # no_new_privs is already set: the zygote set it after its setup.
            landlock.restrict(prepared.ruleset_fd)
        # Every descriptor above the channel, up to the limit the zygote had before its
        # setup: a setup may since have lowered RLIMIT_NOFILE (through ctypes, unseen)
        # above a copy of the control socket, and cannot have raised it.
        os.closerange(CHANNEL_FD + 1, _fd_bound[0])
        limits.apply_run(prepared.rlimits)
        if prepared.seccomp is not None:
            prepared.seccomp.load(no_new_privs_set=True)
        channel.send_frame(CHANNEL_FD, started_frame(prepared.started, _cpu_s()))
        logs.capture()
        operation = runs.plugin.operation(spawn.operation)
        policy.enforcing = True
        op_cpu, op_started = _cpu_s(), _perf()
        try:
            value = operation(ctx, spawn.payload)
        finally:  # the run alone: the plugin's call, not the sandbox around it
            spent = (_cpu_s() - op_cpu, _perf() - op_started)
        policy.enforcing = False
        if policy.violations:
            raise PermissionError("the run attempted what its permissions forbid")
        encoded = _encoded(value, config.max_result_bytes)
        if isinstance(encoded, RunError):
            failed = Result(ok=False, error=encoded)
        else:
            value_json = encoded
    except BaseException as exc:  # everything the plugin raises ends as a typed error
        policy.enforcing = False
        if not channel_ready:  # fd 3 is still the zygote's: the pool child sees the exit
            os._exit(BAD_SPAWN_EXIT)
        failed = Result(ok=False, error=exc.error if type(exc) is LoadError else error_of(
            exc, policy=policy, max_memory_mb=spawn.max_memory_mb,
            max_storage_kb=spawn.max_storage_kb, timeout_ms=int(config.limits["timeout_ms"])))
    logs.flush_all()
    try:
        if failed is None:
            channel.send_frame(CHANNEL_FD, result_frame(
                value_json, network_requests=policy.network_requests, cpu_s=spent[0],
                wall_s=spent[1]))
        else:
            failed.network_requests = policy.network_requests
            failed.cpu_s, failed.wall_s = spent
            channel.send_message(CHANNEL_FD, failed)
    except BaseException:  # the channel is gone or the value cannot be sent: just exit
        os._exit(3)
    os._exit(0)
