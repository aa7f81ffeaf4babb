"""Parsing what arrives on a plugin queue, whoever sent it.

pluginpool's client sends `kwargs={"payload": ..., "instance_id": ...}`; a plain Celery
producer may send `args=[payload]` or `args=[payload, instance_id]`, and names an
operation other than `run` with `kwargs={"operation": ...}`. Anything else is
refused with an `InvalidJobError` naming what is wrong, before anything that recurses over
the payload (pydantic, the sandbox's encoders) sees it: a payload nested deeper than
`max_payload_depth` included, whoever sent it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from pluginpool.policy.errors import InvalidJobError
from pluginpool.tasks.payload import DEFAULT_MAX_PAYLOAD_DEPTH, nesting_depth

JSONValue = Any


class JobRequest(BaseModel):
    """The validated inputs of one plugin run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    payload: JSONValue = None
    instance_id: str | None = None
    operation: str = "run"


def parse_job(args: tuple[Any, ...], kwargs: dict[str, Any], *,
              max_depth: int = DEFAULT_MAX_PAYLOAD_DEPTH) -> JobRequest:
    """Build a JobRequest from a task's positional and keyword arguments."""
    if len(args) > 2:
        raise InvalidJobError(f"expected at most 2 positional arguments, got {len(args)}")
    fields: dict[str, Any] = dict(zip(("payload", "instance_id"), args, strict=False))
    for key, value in kwargs.items():
        if key in fields:
            raise InvalidJobError(f"argument {key!r} given twice")
        fields[key] = value
    unknown = sorted(set(fields) - {"payload", "instance_id", "operation"})
    if unknown:
        raise InvalidJobError(f"unknown arguments {unknown}; expected payload, instance_id, "
                              "operation")
    instance_id = fields.get("instance_id")
    if instance_id is not None and not isinstance(instance_id, str):
        raise InvalidJobError("instance_id must be a string")
    operation = fields.get("operation")
    if operation is None:  # left out (or null): the default operation
        operation = "run"
    if not isinstance(operation, str) or not operation:
        raise InvalidJobError("operation must be a non-empty string")
    payload = fields.get("payload")
    if nesting_depth(payload, limit=max_depth) > max_depth:
        raise InvalidJobError(f"payload is nested deeper than the {max_depth}-level limit "
                              "(PLUGINPOOL_MAX_PAYLOAD_DEPTH)")
    return JobRequest(payload=payload, instance_id=instance_id, operation=operation)
