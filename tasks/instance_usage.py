"""What a run leaves on its instance (usage totals, last run, recent errors, last logs),
queued on the caller's pipeline as one script that writes only while the instance exists
(`instance_usage.lua`): a run in flight at `unload` re-created keys that nothing deleted."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError

from pluginpool.policy.keys import RedisKeys

SOURCE = Path(__file__).with_name("instance_usage.lua").read_text()
SHA = hashlib.sha1(SOURCE.encode()).hexdigest()
"""Queued by its SHA (EVALSHA): the source (1.5 KB) is not sent, nor hashed by Redis, at
every run of an instance. A Redis that lost its scripts answers NOSCRIPT for it alone:
the caller loads it (`reload_if_lost`) and queues the write again."""


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


def reload_if_lost(client: Any, replies: list[Any]) -> bool:
    """True (the script loaded again) when a reply says Redis lost it: the caller queues
    its instance write again on a pipeline of its own."""
    if not any(isinstance(reply, NoScriptError) for reply in replies):
        return False
    client.script_load(SOURCE)
    return True
