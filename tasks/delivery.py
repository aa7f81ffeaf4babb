"""The one decode boundary of the worker's transport: raw queue item → checked message.

Anyone who can write to the broker's Redis can push anything onto a plugin queue, and
kombu and Celery decode it in the worker's main process, where an unexpected exception is
"Unrecoverable error" (the worker dies, and the message may come back to kill the next).
Everything taken off a queue goes through `inspect_delivery` first: it bounds what is
decoded (size, nesting depth, before any recursive decoder runs), decodes it exactly as
kombu and Celery will, and checks the shapes they rely on. Any exception becomes a
`MalformedMessageError` with the reason; the transport dead-letters the item.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from kombu.utils.json import loads

from pluginpool.policy.errors import MalformedMessageError

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
TASK_QUEUE_PREFIX = "plugins."
"""Queues whose messages must be Celery task calls (protocol 2), not just kombu messages."""


@dataclass(frozen=True)
class DeliveryLimits:
    """What the boundary accepts. `max_depth` bounds envelope and body alike: far below
    Python's recursion limit, so neither decoding nor pickling for the pool can recurse
    out of the stack."""

    max_bytes: int = 4 * 1_048_576
    max_depth: int = 80
    task_queue_prefix: str = TASK_QUEUE_PREFIX


def json_depth(text: str) -> int:
    """Deepest nesting of a JSON text, without decoding it (strings are skipped)."""
    brackets = _BRACKETS.sub("", _STRINGS.sub("", text))
    if not brackets:
        return 0
    return max(accumulate(_STEP[char] for char in brackets))


def _decode_json(text: str, what: str, limits: DeliveryLimits) -> Any:
    # The count of opening brackets bounds the depth and costs two C scans: the walk
    # (about 0.1 ms a message in the main process) only when the bound says it may matter.
    if text.count("[") + text.count("{") > limits.max_depth:
        depth = json_depth(text)
        if depth > limits.max_depth:
            raise MalformedMessageError(
                f"{what} is nested {depth} deep, over the {limits.max_depth}-level limit")
    try:
        return loads(text)
    except ValueError as exc:
        raise MalformedMessageError(f"{what} is not JSON: {exc}") from None
    except Exception as exc:  # kombu's type markers run arbitrary decoders
        raise MalformedMessageError(
            f"{what} does not decode: {type(exc).__name__}: {exc}") from None


def inspect_delivery(raw: bytes | str, queue: str, limits: DeliveryLimits) -> dict[str, Any]:
    """The decoded kombu message of a raw queue item, or MalformedMessageError."""
    if len(raw) > limits.max_bytes:
        raise MalformedMessageError(
            f"message is {len(raw)} bytes, over the {limits.max_bytes}-byte limit", queue=queue)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise MalformedMessageError("message is not UTF-8", queue=queue) from None
    try:
        message = _decode_json(text, "message", limits)
        check_message(message, queue, limits)
    except MalformedMessageError as exc:
        raise MalformedMessageError(exc.reason, queue=queue) from None
    return message  # type: ignore[no-any-return]


def check_message(message: Any, queue: str, limits: DeliveryLimits) -> None:
    """The shapes kombu's Message and Celery's consumer rely on, checked on a decoded item."""
    reason = envelope_problem(message)
    if reason is not None:
        raise MalformedMessageError(reason, queue=queue)
    if queue.startswith(limits.task_queue_prefix):
        _check_task_call(message, limits)


def envelope_problem(message: Any) -> str | None:
    """Why a decoded item cannot be a kombu message, or None if it has the right shape."""
    if not isinstance(message, dict):
        return f"message is a JSON {type(message).__name__}, not an object"
    properties = message.get("properties")
    if not isinstance(properties, dict):
        return "message has no 'properties' object"
    if not isinstance(properties.get("delivery_tag"), str | int):
        return "message has no delivery_tag"
    if not isinstance(properties.get("delivery_info", {}), dict):
        return "delivery_info is not an object"
    if not isinstance(message.get("headers") or {}, dict):
        return "headers is not an object"
    encoding = properties.get("body_encoding")
    if encoding not in (None, "base64"):
        return f"body_encoding {str(encoding)[:40]!r} is not supported (only base64)"
    body = message.get("body")
    if encoding == "base64":
        if not isinstance(body, str):
            return "base64 body is not a string"
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "body is not valid base64"
    for field in ("content-type", "content-encoding"):
        if not isinstance(message.get(field) or "", str):
            return f"{field} is not a string"
    return None


_OPTIONAL_STR_HEADERS = ("root_id", "parent_id", "group", "eta", "expires", "lang", "shadow")


def _check_task_call(message: dict[str, Any], limits: DeliveryLimits) -> None:
    """A Celery task call (protocol 2) with JSON body `[args, kwargs, embed]`."""
    headers = message.get("headers") or {}
    for name in ("task", "id"):
        if not isinstance(headers.get(name), str) or not headers[name]:
            raise MalformedMessageError(
                f"not a Celery task message: header {name!r} is missing or not a string")
    for name in _OPTIONAL_STR_HEADERS:
        if headers.get(name) is not None and not isinstance(headers[name], str):
            raise MalformedMessageError(f"header {name!r} is not a string")
    if headers.get("retries") is not None and type(headers["retries"]) is not int:
        raise MalformedMessageError("header 'retries' is not an integer")
    limit = headers.get("timelimit")
    if limit is not None and not (
            isinstance(limit, list | tuple) and len(limit) == 2
            and all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)
                                  and v >= 0) for v in limit)):
        raise MalformedMessageError("header 'timelimit' is not [soft, hard] seconds")
    if message.get("content-type") != "application/json":
        raise MalformedMessageError(
            f"content type {str(message.get('content-type'))[:60]!r} is not application/json")
    body = message.get("body")
    if (message.get("properties") or {}).get("body_encoding") == "base64" and isinstance(body, str):
        try:
            body = base64.b64decode(body).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedMessageError("body is not UTF-8") from None
    if not isinstance(body, str):
        raise MalformedMessageError("body is not a JSON text")
    call = _decode_json(body, "body", limits)
    if not (isinstance(call, list) and len(call) == 3 and isinstance(call[0], list)
            and isinstance(call[1], dict) and (call[2] is None or isinstance(call[2], dict))):
        raise MalformedMessageError(
            "body is not a Celery task call [args, kwargs, embed] (task protocol 2)")
