"""Which plugins an operator has disabled or is draining, read by producers and workers.

A disabled plugin's submits are refused and no worker consumes its queue, so its queued
jobs wait, neither lost nor failed, until it is enabled. A draining one refuses submits
while workers finish its queue."""

from __future__ import annotations

import json
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict

from pluginpool.policy.keys import RedisKeys

Mode = Literal["disabled", "draining"]


class Pause(BaseModel):
    """Why a plugin's submits are refused."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    mode: Mode
    by: str
    at: float


def pause_of(client: redis.Redis, keys: RedisKeys, plugin_id: str) -> Pause | None:
    raw: Any = client.hget(keys.paused, plugin_id)
    return None if raw is None else Pause.model_validate(json.loads(raw))


def all_pauses(client: redis.Redis, keys: RedisKeys) -> dict[str, Pause]:
    raws: dict[Any, Any] = client.hgetall(keys.paused)  # type: ignore[assignment]
    return {key.decode() if isinstance(key, bytes) else str(key):
            Pause.model_validate(json.loads(raw)) for key, raw in raws.items()}


def disabled_ids(client: redis.Redis, keys: RedisKeys) -> set[str]:
    """Plugins whose queues no worker should consume now."""
    return {pid for pid, pause in all_pauses(client, keys).items() if pause.mode == "disabled"}
