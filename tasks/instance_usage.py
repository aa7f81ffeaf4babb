"""What a run leaves on its instance (usage totals, last run, recent errors, last logs),
queued on the caller's pipeline as one script that writes only while the instance exists
(`instance_usage.lua`): a run in flight at `unload` re-created keys that nothing deleted."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError

from pluginpool.policy.keys import RedisKeys

SOURCE = Path(__file__).with_name("instance_usage.lua").read_text()
SHA = hashlib.sha1(SOURCE.encode()).hexdigest()
"""Queued by its SHA (EVALSHA): the source (1.5 KB) is not sent, nor hashed by Redis, at
every run of an instance. A Redis that lost its scripts answers NOSCRIPT for it alone:
the caller writes it again alone (`write_alone`), which loads it."""


def _keys(keys: RedisKeys, instance_id: str) -> tuple[str, str, str]:
    return (keys.instance(instance_id), keys.instance_usage(instance_id),
            keys.instance_errors(instance_id))


def queue_run(pipe: Any, keys: RedisKeys, instance_id: str, *, failed: bool,
              last_run: dict[str, Any], summed: dict[str, float], errors_kept: int) -> None:
    pairs = [item for name, value in summed.items() for item in (name, repr(float(value)))]
    pipe.execute_command("EVALSHA", SHA, 3, *_keys(keys, instance_id), "run", int(failed),
                         json.dumps(last_run), errors_kept if failed else 0, *pairs)


def queue_logs(pipe: Any, keys: RedisKeys, instance_id: str, logs: str) -> None:
    pipe.execute_command("EVALSHA", SHA, 3, *_keys(keys, instance_id), "logs", logs)


def lost(replies: list[Any]) -> bool:
    """A reply says Redis lost the script (restarted, or its cache flushed)."""
    return any(isinstance(reply, NoScriptError) for reply in replies)


def write_alone(client: Any, queue: Callable[[Any], None]) -> list[Any]:
    """Run `queue`'s instance writes on a pipeline of their own (an instance write whose
    script Redis had lost, or one with no result's MULTI to ride on); once more after
    loading the script if it is lost. The replies, errors among them."""
    for attempt in range(2):
        with client.pipeline(transaction=False) as pipe:
            queue(pipe)
            replies: list[Any] = pipe.execute(raise_on_error=False)
        if attempt or not lost(replies):
            break
        client.script_load(SOURCE)
    return replies
