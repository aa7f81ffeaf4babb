"""The one exception tree of pluginpool.

Every error carries data (type, plugin, limit, observed value), never just a string, so
that producers, the breaker and the health aggregator can act on it without parsing text.
Catch `PluginPoolError` for everything pluginpool raises; `SubmitError` for what a
producer's `submit`, `load` or `execute` refuses before anything is enqueued::

    PluginPoolError
    ├── ActionRefusedError  (also ValueError)
    ├── ArtifactError
    │   └── ArtifactTooLargeError  (also ValueError)
    ├── AuthError
    ├── CircuitOpenError
    ├── DeadLetterNotFoundError  (also LookupError)
    ├── DeadLetterNotRequeueableError  (also ValueError)
    ├── DeadLetterUsageError  (also ValueError)
    ├── InstanceUnloadedError  (also ValueError)
    ├── InvalidJobError  (also ValueError)
    ├── JobCancelledError
    ├── JobWaitTimeoutError  (also TimeoutError)
    ├── MalformedMessageError  (also ValueError)
    ├── ManifestError  (also ValueError)
    ├── PluginExecutionError
    ├── RevisionNotFoundError  (also LookupError)
    ├── SettingsError
    ├── StorageQuotaExceededError
    └── SubmitError
        ├── BreakerUnavailableError  (also ConnectionError)
        ├── BrokerUnavailableError  (also ConnectionError)
        ├── InstanceFailedError
        ├── InvalidPayloadError  (also ValueError)
        │   └── PayloadTooDeepError
        ├── PayloadTooLargeError  (also ValueError)
        ├── PluginDisabledError
        ├── UnknownInstanceError  (also LookupError)
        ├── UnknownOperationError  (also LookupError)
        └── UnknownPluginError  (also LookupError)
            └── PluginUnregisteredError

A run's own failure travels as `PluginExecutionError`, whose `ErrorInfo` carries the
error type (`runtime`, `resource`, `timeout`, `security`, `dependency`). Inside a sandbox
a plugin sees the runtime's mirrors (`pool/sandbox/runtime/`: the runtime is stdlib-only
and cannot import this module), which cross the boundary as typed messages and come back
as the errors above. `tests/policy/test_errors.py` keeps this drawing true.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field, field_validator

MAX_ERROR_MESSAGE_CHARS = 4_096
"""Longest error message kept (stored in Redis, sent in events, served by /health)."""
MAX_TRACEBACK_CHARS = 16_384
"""Longest `details["traceback"]` kept; its head and its tail (where the exception is)."""
MAX_DETAIL_CHARS = 4_096
MAX_LOG_CHARS = 1_048_576
"""Longest `details["logs"]` kept (its end); workers keep PLUGINPOOL_MAX_LOG_BYTES already."""
"""Longest other string in `details` (e.g. `attempted`, `reason`)."""
MAX_DETAIL_VALUE_CHARS = 8_192
"""Largest JSON encoding of a list or object in `details` (e.g. `usage`); a larger one is
emptied, with a note beside it saying what was dropped."""
TRUNCATION_MARKER = "...[truncated {} chars]..."
"""Put where text was cut, with the number of characters cut."""


def truncate_text(text: str, limit: int, *, keep_tail: bool = False) -> str:
    """`text` cut to at most `limit` characters, marker included; unchanged if it fits.

    Plugin-supplied text is stored and shown in many places: one 1 MB exception message
    must not become megabytes in Redis, in events and in every /health poll."""
    if len(text) <= limit:
        return text
    room = max(limit - len(TRUNCATION_MARKER.format(len(text))), 0)
    head = room // 2 if keep_tail else room
    return (text[:head] + TRUNCATION_MARKER.format(len(text) - room)
            + text[len(text) - (room - head):])


class ErrorType(StrEnum):
    """The kinds of failure a plugin run can end with."""

    RUNTIME = "runtime"
    """The plugin raised, or its process died and restarts are exhausted."""
    RESOURCE = "resource"
    """A resource limit (memory, network, storage, result size) was crossed."""
    TIMEOUT = "timeout"
    """The run exceeded its wall-clock limit (`timeout_ms`)."""
    SECURITY = "security"
    """The plugin attempted something its permissions forbid. Never retried."""
    DEPENDENCY = "dependency"
    """An unmet `requires` or an import error in the plugin module. Never retried."""


class ErrorInfo(BaseModel):
    """The structured, JSON-serialisable description of one failed run."""

    type: ErrorType
    message: str
    plugin_id: str | None = None
    instance_id: str | None = None
    job_id: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)

    @field_validator("message")
    @classmethod
    def _bounded_message(cls, value: str) -> str:
        return truncate_text(value, MAX_ERROR_MESSAGE_CHARS)

    @field_validator("details")
    @classmethod
    def _bounded_details(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Plugin-supplied strings are cut; a list or object too large (or too deep) to
        encode within MAX_DETAIL_VALUE_CHARS is emptied (its type kept, for readers such as
        `details.get("usage", {})`) and `<key>_dropped` says what was dropped."""
        bounded: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(item, str):
                if key == "logs":  # the end of a run's output says most
                    bounded[key] = item if len(item) <= MAX_LOG_CHARS else (
                        TRUNCATION_MARKER.format(len(item) - MAX_LOG_CHARS)
                        + item[-MAX_LOG_CHARS:])
                    continue
                limit = MAX_TRACEBACK_CHARS if key == "traceback" else MAX_DETAIL_CHARS
                bounded[key] = truncate_text(item, limit, keep_tail=key == "traceback")
            elif isinstance(item, dict | list | tuple):
                try:
                    size = len(json.dumps(item, default=str))
                except (ValueError, TypeError, RecursionError):
                    size = -1
                if 0 <= size <= MAX_DETAIL_VALUE_CHARS:
                    bounded[key] = item
                else:
                    bounded[key] = {} if isinstance(item, dict) else []
                    bounded[f"{key}_dropped"] = (
                        f"[dropped: {'not encodable' if size < 0 else f'{size} chars'}, over"
                        f" the {MAX_DETAIL_VALUE_CHARS}-char limit]")
            else:
                bounded[key] = item
        return bounded


class PluginPoolError(Exception):
    """Root of every error pluginpool raises on purpose."""


class SettingsError(PluginPoolError):
    """A setting is invalid; the message names the environment variable."""


class PluginExecutionError(PluginPoolError):
    """A plugin run ended in failure.

    Built from one `ErrorInfo` (or its dict form) so that it survives Celery's JSON
    result backend: the backend stores `args` and rebuilds the exception with them.
    """

    def __init__(self, info: ErrorInfo | dict[str, Any]) -> None:
        self.info = info if isinstance(info, ErrorInfo) else ErrorInfo.model_validate(info)
        super().__init__(self.info.model_dump(mode="json"))

    @classmethod
    def of(
        cls,
        type_: ErrorType,
        message: str,
        *,
        plugin_id: str | None = None,
        instance_id: str | None = None,
        job_id: str | None = None,
        **details: Any,
    ) -> PluginExecutionError:
        """Shorthand that builds the `ErrorInfo` from keywords."""
        return cls(
            ErrorInfo(
                type=type_,
                message=message,
                plugin_id=plugin_id,
                instance_id=instance_id,
                job_id=job_id,
                details=details,
            )
        )

    @property
    def type(self) -> ErrorType:
        return self.info.type

    @property
    def plugin_id(self) -> str | None:
        return self.info.plugin_id

    @property
    def instance_id(self) -> str | None:
        return self.info.instance_id

    @property
    def job_id(self) -> str | None:
        return self.info.job_id

    @property
    def message(self) -> str:
        return self.info.message

    @property
    def details(self) -> dict[str, Any]:
        return self.info.details

    def __str__(self) -> str:
        return f"[{self.info.type}] {self.info.plugin_id}: {self.info.message}"


class SubmitError(PluginPoolError):
    """A job was refused at submit; nothing was enqueued."""


class UnknownPluginError(SubmitError, LookupError):
    """No plugin with this id is registered."""

    def __init__(self, plugin_id: str) -> None:
        self.plugin_id = plugin_id
        super().__init__(f"unknown plugin {plugin_id!r}: register it first")


class UnknownInstanceError(SubmitError, LookupError):
    """No loaded plugin instance has this id (never loaded, or unloaded)."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        super().__init__(f"unknown plugin instance {instance_id!r}")


class UnknownOperationError(SubmitError, LookupError):
    """The plugin's manifest does not list this operation (`operations`, default ["run"])."""

    def __init__(self, plugin_id: str, operation: str, *, operations: list[str]) -> None:
        self.plugin_id = plugin_id
        self.operation = operation
        self.operations = list(operations)
        super().__init__(f"plugin {plugin_id!r} has no operation {operation[:100]!r}; "
                         f"it has {', '.join(self.operations)}")


class InvalidPayloadError(SubmitError, ValueError):
    """The payload (or initial_data) is not acceptable JSON: not serialisable, NaN, too deeply
    nested, or an initial_data that is not an object."""

    def __init__(self, plugin_id: str, reason: str, *, field: str = "payload") -> None:
        self.plugin_id = plugin_id
        self.reason = reason
        self.field = field
        super().__init__(f"{field} for {plugin_id!r} is refused: {reason}")


class PayloadTooDeepError(InvalidPayloadError):
    """The payload nests lists/objects deeper than `max_payload_depth`.

    Refused before any encoder runs: encoders, decoders and pickle recurse per level and a
    deep enough value makes them raise RecursionError (in a worker: in its main process)."""

    def __init__(self, plugin_id: str, *, depth_limit: int, field: str = "payload") -> None:
        self.depth_limit = depth_limit
        super().__init__(plugin_id, f"nested deeper than the {depth_limit}-level limit "
                                    "(PLUGINPOOL_MAX_PAYLOAD_DEPTH)", field=field)


class PayloadTooLargeError(SubmitError, ValueError):
    """The encoded payload is larger than `max_payload_bytes`."""

    def __init__(self, plugin_id: str, *, size_bytes: int, limit_bytes: int) -> None:
        self.plugin_id = plugin_id
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes
        super().__init__(
            f"payload for {plugin_id!r} is {size_bytes} bytes, over the {limit_bytes}-byte limit"
        )


class BrokerUnavailableError(SubmitError, ConnectionError):
    """Redis (broker or registry) could not be reached; nothing was enqueued."""


class ManifestIssue(BaseModel):
    """One problem found in a manifest: where it is and what is wrong."""

    file: str
    plugin_id: str | None
    field: str
    problem: str

    def __str__(self) -> str:
        plugin = self.plugin_id or "?"
        return f"{self.file}: plugin {plugin}: {self.field}: {self.problem}"


class ManifestError(PluginPoolError, ValueError):
    """A manifest is malformed. Lists every issue; nothing was registered."""

    def __init__(self, issues: list[ManifestIssue]) -> None:
        self.issues = issues
        lines = "\n  ".join(str(issue) for issue in issues)
        super().__init__(f"{len(issues)} problem(s) in manifest:\n  {lines}")


class InstanceUnloadedError(PluginPoolError, ValueError):
    """A run wrote to `ctx.storage` of an instance unloaded meanwhile: refused, so that
    nothing of an instance stays in Redis once `unload` has run."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        super().__init__(f"plugin instance {instance_id!r} was unloaded: its storage is gone")


class InvalidJobError(PluginPoolError, ValueError):
    """A message on a plugin queue that pluginpool cannot parse (e.g. a foreign producer)."""


class JobWaitTimeoutError(PluginPoolError, TimeoutError):
    """Waiting for a job's outcome took longer than the caller allowed; the job goes on."""

    def __init__(self, job_id: str, *, timeout_s: float) -> None:
        self.job_id = job_id
        self.timeout_s = timeout_s
        super().__init__(f"job {job_id} has no outcome after {timeout_s} s (it may still run)")


class CircuitOpenError(PluginPoolError):
    """Dispatch to a plugin was refused by its circuit breaker; nothing ran.

    Built from one dict so that it survives Celery's JSON result backend (a job that was
    queued before the breaker opened fails with it at the worker).
    """

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = dict(info)
        super().__init__(self.info)

    @classmethod
    def of(cls, plugin_id: str, *, state: str, retry_after_ms: int,
           job_id: str | None = None) -> CircuitOpenError:
        return cls({"plugin_id": plugin_id, "state": state, "retry_after_ms": retry_after_ms,
                    "job_id": job_id})

    @property
    def plugin_id(self) -> str:
        return str(self.info["plugin_id"])

    @property
    def state(self) -> str:
        return str(self.info["state"])

    @property
    def retry_after_ms(self) -> int:
        """Milliseconds until the next trial; 0 while trials run; -1 when forced open."""
        return int(self.info["retry_after_ms"])

    def __str__(self) -> str:
        wait = self.retry_after_ms
        when = ("until an operator resets it" if wait < 0 else
                "while trial runs are in progress" if wait == 0 else f"for another {wait} ms")
        return f"circuit for plugin {self.plugin_id!r} is {self.state}: dispatch refused {when}"


class BreakerUnavailableError(SubmitError, ConnectionError):
    """The breaker's Redis is unreachable and breaker_fail_mode is "closed"."""


class InstanceFailedError(SubmitError):
    """The instance failed a run and its plugin has `error_recovery = false`: load it anew."""

    def __init__(self, instance_id: str, last_error: dict[str, Any] | None) -> None:
        self.instance_id = instance_id
        self.last_error = last_error
        super().__init__(f"plugin instance {instance_id!r} failed and does not recover: "
                         f"{(last_error or {}).get('message', 'unknown error')}")


class PluginUnregisteredError(UnknownPluginError):
    """The plugin was registered once and has been unregistered; new jobs are refused."""

    def __init__(self, plugin_id: str, *, last_revision: int) -> None:
        self.last_revision = last_revision
        super().__init__(plugin_id)
        self.args = (f"plugin {plugin_id!r} was unregistered (last revision {last_revision});"
                     " register it again to serve it",)


class RevisionNotFoundError(PluginPoolError, LookupError):
    """A rollback named a revision the registry's bounded history no longer holds."""

    def __init__(self, plugin_id: str, revision: int | None, *, available: list[int]) -> None:
        self.plugin_id = plugin_id
        self.revision = revision
        self.available = available
        wanted = "earlier revision" if revision is None else f"revision {revision}"
        super().__init__(f"plugin {plugin_id!r} has no {wanted} to roll back to"
                         f" (history holds {available or 'none'})")


class ArtifactError(PluginPoolError):
    """A plugin's code artifact could not be built, published, fetched or verified.

    `reason` is one of: build, too_large, missing, hash_mismatch, invalid, unpack, cache. A
    worker turns it into a `dependency` error (never retried) and goes on serving."""

    def __init__(self, reason: str, message: str, *, plugin_id: str | None = None,
                 sha256: str | None = None, **details: Any) -> None:
        self.reason = reason
        self.plugin_id = plugin_id
        self.sha256 = sha256
        self.details = details
        super().__init__(message)


class ArtifactTooLargeError(ArtifactError, ValueError):
    """An artifact is larger than PLUGINPOOL_MAX_ARTIFACT_BYTES; nothing was published."""

    def __init__(self, *, plugin_id: str | None, size_bytes: int, limit_bytes: int) -> None:
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes
        super().__init__("too_large", f"artifact of {plugin_id!r} is {size_bytes} bytes, over"
                         f" the {limit_bytes}-byte limit (PLUGINPOOL_MAX_ARTIFACT_BYTES)",
                         plugin_id=plugin_id, size_bytes=size_bytes, limit_bytes=limit_bytes)


class MalformedMessageError(PluginPoolError, ValueError):
    """A broker message that cannot be a job: it is dead-lettered, never delivered.

    Raised at the one decode boundary of the worker's transport (`tasks/delivery.py`), for
    anything on a queue that no producer of ours would send: not JSON, too large, nested
    too deep, an undecodable type marker, a body that is not a task call."""

    def __init__(self, reason: str, *, queue: str | None = None) -> None:
        self.reason = reason
        self.queue = queue
        super().__init__(reason)


class DeadLetterUsageError(PluginPoolError, ValueError):
    """The command was asked for something it cannot do as given."""


class DeadLetterNotFoundError(PluginPoolError, LookupError):
    """No dead letter has this id (it was requeued, discarded or evicted)."""

    def __init__(self, entry_id: str) -> None:
        self.entry_id = entry_id
        super().__init__(f"no dead letter {entry_id!r}")


class DeadLetterNotRequeueableError(PluginPoolError, ValueError):
    """Only whole messages within the size bound can go back to a queue."""

    def __init__(self, entry_id: str) -> None:
        self.entry_id = entry_id
        super().__init__(f"dead letter {entry_id!r} cannot be requeued: only a preview of it "
                         "was kept, or it is not a message with a delivery tag")


class PluginDisabledError(SubmitError):
    """An operator disabled (or is draining) the plugin: new jobs are refused; jobs already
    queued wait (disabled) or finish (draining)."""

    def __init__(self, plugin_id: str, *, mode: str = "disabled", by: str | None = None) -> None:
        self.plugin_id = plugin_id
        self.mode = mode
        self.by = by
        super().__init__(f"plugin {plugin_id!r} is {mode}"
                         f"{f' (by {by})' if by else ''}: new jobs are refused")


class JobCancelledError(PluginPoolError):
    """The job was cancelled or purged by an operator: it never ran, or its run was killed.

    Built from one dict so that it survives Celery's JSON result backend."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = dict(info)
        super().__init__(self.info)

    @classmethod
    def of(cls, job_id: str, *, plugin_id: str | None, reason: str = "cancelled",
           by: str | None = None) -> JobCancelledError:
        return cls({"job_id": job_id, "plugin_id": plugin_id, "reason": reason, "by": by})

    @property
    def job_id(self) -> str:
        return str(self.info.get("job_id"))

    @property
    def reason(self) -> str:
        return str(self.info.get("reason", "cancelled"))

    def __str__(self) -> str:
        by = self.info.get("by")
        return (f"job {self.job_id} of plugin {self.info.get('plugin_id')!r} was "
                f"{self.reason}{f' by {by}' if by else ''}")


class ActionRefusedError(PluginPoolError, ValueError):
    """An operator action cannot be done as asked (e.g. cancel a job that already ended)."""


class AuthError(PluginPoolError):
    """A request to the HTTP API without a valid token (401) or with too small a role (403)."""

    def __init__(self, message: str, *, status: int) -> None:
        self.status = status
        super().__init__(message)


class StorageQuotaExceededError(PluginPoolError):
    """A write would take an instance's storage (`ctx.storage`) over `max_storage_kb`.

    Raised by the worker's storage; a sandboxed plugin sees the runtime's own
    `StorageQuotaExceededError` (pool/sandbox/runtime/context.py; same name, and likewise
    its `InstanceUnloadedError`), which carries the same
    figures across the boundary: the runtime cannot import this package."""

    def __init__(self, *, limit_bytes: int, observed_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.observed_bytes = observed_bytes
        super().__init__(f"storage quota of {limit_bytes} bytes exceeded "
                         f"({observed_bytes} bytes would be used)")
