"""A submit's own checks and writes, carried by its publish: no round trip of their own.

The producer used to ask Redis whether the plugin is paused (an HGET) and write the job's
`queued` status (a script call) before publishing it: two round trips per submit beyond
Celery's. When pluginpool's keys and the broker's queues live in one Redis database (the
default: one URL), both travel in the message's publish instead (`publish.lua`, issue 16):
the script refuses the push if an operator disabled or is draining the plugin, exactly as
the HGET did (it reads the same hash at the same instant), and writes `queued`, the job's
first change, in the same atomic step as the push, so no worker can start it before.

The producer puts a `SubmitStep` in the message's headers (`SUBMIT_HEADER`); the transport
leaves it out of the message it encodes (`take`), so it never reaches the wire, and
appends its keys and arguments to the publish script's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pluginpool.policy.errors import PluginDisabledError
from pluginpool.policy.keys import RedisKeys
from pluginpool.tasks.job_status import encode_change

SUBMIT_HEADER = "pluginpool_submit_step"


@dataclass(frozen=True)
class SubmitStep:
    """What publish.lua checks and writes for one plugin job (its KEYS[3..5], ARGV[6..10])."""

    plugin_id: str
    paused_key: str
    status_key: str
    channel: str
    queued: str
    """The `queued` change, complete (status and seq 1): the script only stores it."""
    ttl_s: int
    sent_event: tuple[str, str] | None = None
    """The job's `task-sent` event (channel, message) for the script to PUBLISH after the
    push (tasks/sent_event.py); None: Celery sends it."""

    @classmethod
    def for_job(cls, keys: RedisKeys, *, plugin_id: str, job_id: str,
                instance_id: str | None, ttl_s: int) -> SubmitStep:
        change = encode_change(job_id, plugin_id=plugin_id, instance_id=instance_id)
        return cls(plugin_id=plugin_id, paused_key=keys.paused,
                   status_key=keys.job_status(job_id), channel=keys.job_channel(job_id),
                   queued=change[:-1] + ',"status":"queued","seq":1}', ttl_s=ttl_s)

    def script_keys(self) -> list[str]:
        return [self.paused_key, self.status_key, self.channel]

    def script_args(self, *, broker_prefix: str = "") -> list[Any]:
        """`broker_prefix`: kombu's `global_keyprefix`, which its fanout channels (the
        event's) carry; pluginpool's own keys here do not."""
        if self.sent_event is None:
            return [self.plugin_id, self.queued, self.ttl_s]
        channel, message = self.sent_event
        return [self.plugin_id, self.queued, self.ttl_s, broker_prefix + channel, message]

    def check(self, reply: Any) -> None:
        """Raise PluginDisabledError if the script refused the push (it returns the pause)."""
        if isinstance(reply, bytes | str):
            pause = json.loads(reply)
            raise PluginDisabledError(self.plugin_id, mode=pause["mode"], by=pause["by"])


def take(message: Any) -> tuple[SubmitStep | None, Any]:
    """The step a producer put in a message's headers, and the message without it (a copy:
    a publish kombu retries after a lost connection still carries its step)."""
    headers = message.get("headers") if isinstance(message, dict) else None
    if not isinstance(headers, dict) or SUBMIT_HEADER not in headers:
        return None, message
    step = headers[SUBMIT_HEADER]
    rest = {**message, "headers": {k: v for k, v in headers.items() if k != SUBMIT_HEADER}}
    return (step if isinstance(step, SubmitStep) else None), rest
