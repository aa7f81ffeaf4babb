"""What a run leaves on its instance (usage totals, last run, recent errors, last logs),
queued on the caller's pipeline as one script that writes only while the instance exists
(`instance_usage.lua`): a run in flight at `unload` re-created keys that nothing deleted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pluginpool.policy.keys import RedisKeys

SOURCE = Path(__file__).with_name("instance_usage.lua").read_text()
"""Sent with EVAL (Redis caches it by its hash): only runs of an instance pay it."""


def _keys(keys: RedisKeys, instance_id: str) -> tuple[str, str, str]:
    return (keys.instance(instance_id), keys.instance_usage(instance_id),
            keys.instance_errors(instance_id))


def queue_run(pipe: Any, keys: RedisKeys, instance_id: str, *, failed: bool,
              last_run: dict[str, Any], summed: dict[str, float], errors_kept: int) -> None:
    pairs = [item for name, value in summed.items() for item in (name, repr(float(value)))]
    pipe.execute_command("EVAL", SOURCE, 3, *_keys(keys, instance_id), "run", int(failed),
                         json.dumps(last_run), errors_kept if failed else 0, *pairs)


def queue_logs(pipe: Any, keys: RedisKeys, instance_id: str, logs: str) -> None:
    pipe.execute_command("EVAL", SOURCE, 3, *_keys(keys, instance_id), "logs", logs)
