"""Every message that crosses the sandbox boundary, defined once, encoded and decoded here.

Two channels carry them, both as length-prefixed JSON frames (channel.py):

- the *control* channel between the pool child and a warm sandbox's zygote:
  Hello, ZygoteConfig → (StorageRequest ↔ StorageReply)* → Ready | SetupFailed; then per run
  Spawn (+ the run's channel descriptor) → Forked → Exited; finally Close → Closed;
- the *run* channel between the pool child's supervisor and one run's process:
  Started → (StorageRequest ↔ StorageReply | Log)* → Result;
- the *guardian* socket between a pool child and its zygotes' guardian (guardian.py):
  Hello, then (Launch → Launched | LaunchFailed)*.

Standard library only: this module is imported inside the zygote, which holds nothing of
the worker's. The worker side imports the same module as pluginpool.pool.sandbox.runtime.
"""

from __future__ import annotations

from json import dumps as _dumps

from .records import field, fields_of, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar

RUNTIME = "runtime"
RESOURCE = "resource"
TIMEOUT = "timeout"
SECURITY = "security"
DEPENDENCY = "dependency"
"""Error types, spelled as pluginpool.policy.errors.ErrorType spells them."""


@record
class RunError:
    """A failure seen inside the sandbox: during setup, a run or the teardown."""

    type: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@record
class Message:
    """Base of every frame; `op` names the concrete class on the wire."""

    op: ClassVar[str] = ""


@record
class Hello(Message):
    """The zygote's first frame, once it has detached: who it is, its bare size."""

    op: ClassVar[str] = "hello"
    pid: int
    rss_bytes: int


@record
class ZygoteConfig(Message):
    """Everything a zygote needs, passed explicitly: it reads no environment, no settings."""

    op: ClassVar[str] = "config"
    plugin_id: str
    entrypoint: str
    operations: list[str]
    instance_id: str | None
    initial_data: dict[str, Any]
    code_paths: list[str]
    read_paths: list[str]
    home: str
    setup_workspace: str
    landlock_abi: int
    zygote_seccomp_b64: str | None
    run_seccomp_b64: str | None
    max_memory_mb: int
    max_storage_kb: int
    setup_cpu_s: int
    network_hosts: list[str]
    max_network_requests: int
    allow_processes: bool
    max_result_bytes: int
    limits: dict[str, Any]
    permissions: dict[str, Any]
    run_workspace: str | None = None
    """The one workspace every run gets (emptied by the pool child after each run), so its
    Landlock layer is built once; a Spawn naming another workspace gets its own layer."""
    run_cpu_backstop_s: int = 0
    """The runs' CPU-seconds backstop, so their whole lock-down is worked out once (0: each
    run works out its own from its Spawn)."""


@record
class Ready(Message):
    op: ClassVar[str] = "ready"
    pid: int
    setup_ms: float
    setup_cpu_ms: float
    rss_bytes: int
    layers: dict[str, Any]


@record
class SetupFailed(Message):
    op: ClassVar[str] = "setup_failed"
    error: RunError


@record
class Spawn(Message):
    """Fork one run. Its channel descriptor travels right before this frame (SCM_RIGHTS)."""

    op: ClassVar[str] = "spawn"
    job_id: str
    operation: str
    payload: Any
    attempt: int
    workspace: str
    cpu_backstop_s: int
    max_memory_mb: int
    max_storage_kb: int


@record
class Forked(Message):
    op: ClassVar[str] = "forked"
    pid: int
    zygote_rss_bytes: int


@record
class Exited(Message):
    """The run's process was reaped by the zygote (its parent): exact kernel accounting."""

    op: ClassVar[str] = "exited"
    pid: int
    status: int
    cpu_s: float
    maxrss_kb: int


@record
class Launch(Message):
    """Start a zygote (the pool child to its guardian, guardian.py): the zygote's end of
    its control socket and its stdout and stderr pipes travel with it (SCM_RIGHTS), in
    that order; the guardian gives it the control socket as fd 3."""

    op: ClassVar[str] = "launch"
    ref: int
    """Echoed in the answer: a launch the pool child gave up on (interrupted by Celery's
    soft limit) must not have its answer taken for the next one's."""
    argv: list[str]
    env: dict[str, Any]


@record
class Launched(Message):
    op: ClassVar[str] = "launched"
    ref: int
    pid: int


@record
class LaunchFailed(Message):
    op: ClassVar[str] = "launch_failed"
    ref: int
    reason: str


@record
class Close(Message):
    op: ClassVar[str] = "close"
    reason: str


@record
class Closed(Message):
    op: ClassVar[str] = "closed"
    error: RunError | None = None
    teardown: bool = False
    """The plugin defines close() and it was called."""


@record
class Started(Message):
    """The run is locked down; plugin code starts now. CPU so far is the sandbox's own."""

    op: ClassVar[str] = "started"
    layers: dict[str, Any]
    cpu_s: float


@record
class StorageRequest(Message):
    op: ClassVar[str] = "storage"
    action: str
    key: str | None = None
    value: Any = None


@record
class StorageReply(Message):
    op: ClassVar[str] = "storage_reply"
    ok: bool
    value: Any = None
    quota: bool = False
    limit_bytes: int = 0
    observed_bytes: int = 0
    message: str = ""
    unloaded: bool = False
    """The instance was unloaded: InstanceUnloadedError in the run."""


@record
class Result(Message):
    op: ClassVar[str] = "result"
    ok: bool
    value: Any = None
    error: RunError | None = None
    network_requests: int = 0
    cpu_s: float = 0.0
    """CPU time of the operation's call alone, measured in the run (the kernel's figure
    at exit bounds it)."""
    wall_s: float = 0.0
    """Wall time of the operation's call, measured in the run."""


@record
class Log(Message):
    """Some of the run's output: stream is stdout, stderr or log (ctx.logger)."""

    op: ClassVar[str] = "log"
    stream: str
    text: str


_TYPES: dict[str, type[Message]] = {cls.op: cls for cls in (
    Hello, ZygoteConfig, Ready, SetupFailed, Spawn, Forked, Exited, Launch, Launched,
    LaunchFailed, Close, Closed, Started, StorageRequest, StorageReply, Result, Log)}
_NESTED_ERRORS = ("error",)
_FIELDS: dict[type[Message], tuple[str, ...]] = {cls: fields_of(cls) for cls in _TYPES.values()}
_ERROR_FIELDS = fields_of(RunError)


class ProtocolError(ValueError):
    """A frame that is not one of the messages above."""


def encode(message: Message) -> dict[str, Any]:
    """The JSON object for a message (channel.py turns it into bytes). Shallow: a run's
    value is not copied."""
    frame: dict[str, Any] = {"op": message.op}
    for name in _FIELDS[type(message)]:
        value = getattr(message, name)
        if isinstance(value, RunError):
            value = {key: getattr(value, key) for key in _ERROR_FIELDS}
        frame[name] = value
    return frame


# Frames a zygote or a run writes on every run, formatted without building a message:
# each is what encode() gives for the same fields (the pool child decodes them as usual),
# but the code between a fork and the run's exit touches fewer pages (each one touched
# after the fork is a copy-on-write fault).

def started_prefix(layers: dict[str, Any]) -> bytes:
    """Built in the zygote before the fork: a Started frame up to its CPU figure."""
    return _dumps({"op": Started.op, "layers": layers})[:-1].encode() + b', "cpu_s": '


def started_frame(prefix: bytes, cpu_s: float) -> bytes:
    return b"%s%r}" % (prefix, cpu_s)


def forked_frame(pid: int, zygote_rss_bytes: int) -> bytes:
    return b'{"op": "forked", "pid": %d, "zygote_rss_bytes": %d}' % (pid, zygote_rss_bytes)


def exited_frame(pid: int, status: int, cpu_s: float, maxrss_kb: int) -> bytes:
    return b'{"op": "exited", "pid": %d, "status": %d, "cpu_s": %r, "maxrss_kb": %d}' % (
        pid, status, cpu_s, maxrss_kb)


def result_frame(value_json: bytes, *, network_requests: int, cpu_s: float,
                 wall_s: float) -> bytes:
    """A successful Result around a value already encoded (once: its size is checked on
    the same bytes)."""
    return (b'{"op": "result", "ok": true, "value": %s, "error": null, '
            b'"network_requests": %d, "cpu_s": %r, "wall_s": %r}') % (
        value_json, network_requests, cpu_s, wall_s)


ERROR_TYPES = frozenset((RUNTIME, RESOURCE, TIMEOUT, SECURITY, DEPENDENCY))
_INT_RANGES = {"pid": (1, (1 << 31) - 1), "status": (0, 0xFFFF),
               "network_requests": (0, 1 << 62), "maxrss_kb": (0, 1 << 62),
               "rss_bytes": (0, 1 << 62), "zygote_rss_bytes": (0, 1 << 62)}
"""Fields a kernel call takes (a pid, a wait status: os.WIFSIGNALED and friends), and
counts and sizes, which are never negative."""
_WIDEST_INT = 1 << 63
_KINDS: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,),
    "list": (list,)}
_CHECKS: dict[type, tuple[tuple[tuple[type, ...] | None, bool, str], ...]] = {}
"""Per record class: (the types each field's value may have, None: any; whether it may be
null; its name)."""


def _checks_of(cls: type) -> tuple[tuple[tuple[type, ...] | None, bool, str], ...]:
    """A record's field checks, from its annotations (strings: `from __future__ import
    annotations`); worked out at the first decode of the class, not at import (the zygote
    and its runs never need most of them)."""
    found = _CHECKS.get(cls)
    if found is None:
        annotations: dict[str, str] = {}
        for base in reversed(cls.__mro__):
            annotations.update(vars(base).get("__annotations__", {}))
        checks: list[tuple[tuple[type, ...] | None, bool, str]] = []
        for name in fields_of(cls):
            parts = [part.strip() for part in str(annotations[name]).split("|")]
            nullable = "None" in parts
            kinds = [part.split("[")[0] for part in parts if part != "None"]
            if "Any" in kinds:
                checks.append((None, True, name))
            elif kinds == ["RunError"]:
                checks.append(((RunError,), nullable, name))
            else:
                checks.append((tuple(k for kind in kinds for k in _KINDS[kind]), nullable,
                               name))
        found = _CHECKS[cls] = tuple(checks)
    return found


def _check(item: Any) -> None:
    """Each field of a decoded record has its annotated type (ints within what the kernel
    takes): a frame from a run or a zygote is written by code that may be hostile, and a
    field of the wrong type must be a ProtocolError here, not a TypeError wherever the
    pool child first uses it."""
    for kinds, nullable, name in _checks_of(type(item)):
        value: Any = getattr(item, name)
        if value is None:
            if nullable:
                continue
            raise ProtocolError(f"{name} must not be null")
        if kinds is None:
            continue
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ProtocolError(f"{name} is a {type(value).__name__}")
        if float in kinds:  # a float field (an int is one too) is a duration or a size
            number: float = getattr(item, name)  # (isinstance above narrowed it to object)
            if not (number - number == 0 and 0 <= number <= _WIDEST_INT):  # NaN, infinities,
                # negatives, and ints too large to be a float
                raise ProtocolError(f"{name} {value} is not a finite, non-negative number")
        elif isinstance(value, int) and not isinstance(value, bool):
            low, high = _INT_RANGES.get(name, (-_WIDEST_INT, _WIDEST_INT))
            if not low <= value <= high:
                raise ProtocolError(f"{name} {value} is out of range")
        elif isinstance(value, list) and not all(isinstance(item, str) for item in value):
            raise ProtocolError(f"{name} must be a list of strings")


def decode(frame: dict[str, Any]) -> Message:
    """A typed message from a frame, every field of its annotated type; anything else is a
    ProtocolError."""
    cls = _TYPES.get(str(frame.get("op")))
    if cls is None:
        raise ProtocolError(f"unknown message {str(frame.get('op'))[:64]!r}")
    fields = _FIELDS[cls]
    values = {k: v for k, v in frame.items() if k in fields}
    try:
        for name in _NESTED_ERRORS:
            if isinstance(values.get(name), dict):
                error = values[name] = RunError(**values[name])
                _check(error)
                if error.type not in ERROR_TYPES:
                    raise ProtocolError(f"unknown error type {error.type[:64]!r}")
        message = cls(**values)
    except TypeError as exc:
        raise ProtocolError(f"bad {cls.op} message: {exc}") from None
    _check(message)
    return message
