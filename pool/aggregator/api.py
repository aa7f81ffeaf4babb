"""The aggregator's JSON API beyond /health: a plugin's whole page, workers, the audit log,
dead letters, and the operator actions (POST), each calling the one implementation in
tasks/operations.py as the identified caller.

GET  /api/whoami                      role, name, CSRF token for the dashboard
GET  /api/plugins/<id>                limits, usage, runs, errors, breaker, revisions,
                                      workers, warm sandboxes, pause, queued, audit
GET  /api/workers                     live workers: queues, load, heartbeat
GET  /api/audit[?target=&limit=]      operator actions, newest first
GET  /api/deadletters[?limit=&offset=]
POST /api/plugins/<id>/{disable,enable,drain,purge,breaker-reset,breaker-force-open}
POST /api/jobs/<id>/cancel
POST /api/deadletters/<id>/{requeue,discard}
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote

from pluginpool.pool.aggregator.auth import Identity
from pluginpool.tasks.audit import Actor
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.health import LIVE_AFTER_MISSED_BEATS
from pluginpool.tasks.runs import RecentRuns

RECENT_ERRORS = 20
MAX_LIMIT = 500


class NotFound(LookupError):
    """No such API path."""


MAX_OFFSET = 1 << 31
"""Beyond it an offset is not a position in any list here (Redis refuses it: was a 503)."""


def query_int(query: dict[str, list[str]], name: str, default: int, *, low: int,
              high: int) -> int:
    """An integer query parameter within [low, high]; ValueError (a 400) naming it if it is
    not one, or is out of range (a silent default or clamp hid a caller's mistake)."""
    values = query.get(name)
    if not values or values[0] == "":
        return default
    try:
        value = int(values[0])
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {values[0][:40]!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value}")
    return value


def _limit(query: dict[str, list[str]], default: int = 100) -> int:
    return query_int(query, "limit", default, low=1, high=MAX_LIMIT)


class Api:
    def __init__(self, client: PluginClient, *, running: Callable[[], dict[str, int]],
                 worker_load: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.client = client
        self.keys = client.settings.keys
        self._running = running
        self._load = worker_load

    # -- reads --------------------------------------------------------------------------

    def get(self, path: str, query_string: str, identity: Identity) -> Any:
        query = parse_qs(query_string)
        parts = [unquote(part) for part in path.strip("/").split("/")[1:]]  # after "api"
        if parts == ["whoami"]:
            return {"role": identity.role, "who": identity.who, "csrf": identity.csrf,
                    "can_act": identity.can_act}
        if parts == ["workers"]:
            return {"workers": self.workers()}
        if parts == ["audit"]:
            target = query.get("target", [None])[0]
            return {"entries": [e.model_dump(mode="json") for e in
                                self.client.audit_log(limit=_limit(query), target=target)]}
        if parts == ["deadletters"]:
            offset = query_int(query, "offset", 0, low=0, high=MAX_OFFSET)
            total, entries = self.client.dead_letters(limit=_limit(query), offset=offset)
            return {"total": total, "entries": [e.summary() for e in entries]}
        if len(parts) == 2 and parts[0] == "plugins":
            return self.plugin(parts[1])
        raise NotFound(path)

    def plugin(self, plugin_id: str) -> dict[str, Any]:
        client = self.client
        spec = client.spec(plugin_id)
        health = client.health(plugin_id)
        assert not isinstance(health, list)
        health = health.model_copy(update={"running": self._running().get(plugin_id, 0)})
        redis = client.redis
        errors = [json.loads(raw) for raw in
                  redis.lrange(self.keys.recent_errors(plugin_id), 0, RECENT_ERRORS - 1)]
        pause = client.pause(plugin_id)
        workers = self.workers()
        return {
            "spec": spec.model_dump(mode="json", exclude={"artifact"}),
            "health": health.model_dump(mode="json"),
            "breaker": client.breaker(plugin_id).as_dict(),
            "pause": None if pause is None else pause.model_dump(mode="json"),
            "queue": spec.queue,
            "queued": client.queued(plugin_id),
            "revisions": [r.model_dump(mode="json") for r in client.revisions(plugin_id)],
            "recent_errors": errors,
            "recent_runs": RecentRuns(redis, self.keys).read(plugin_id),
            "workers": [w for w in workers if spec.queue in w["queues"]],
            "warm_sandboxes": self.warm_sandboxes(plugin_id),
            "audit": [e.model_dump(mode="json") for e in
                      client.audit_log(limit=20, target=plugin_id)],
        }

    def workers(self) -> list[dict[str, Any]]:
        """Every worker with a recent heartbeat: node, host, queues, what it runs now."""
        now = time.time()
        heartbeat_s = self.client.settings.worker_heartbeat_s
        load = self._load()
        out = []
        for node, entry in sorted(self.client.health_reader.roster.entries().items()):
            age = now - float(entry.get("at", 0))
            out.append({"node": str(node), "host": entry.get("host"), "pid": entry.get("pid"),
                        "queues": list(entry.get("queues", [])),
                        "live": age <= heartbeat_s * LIVE_AFTER_MISSED_BEATS,
                        "heartbeat_age_s": round(age, 1),
                        "load": load.get(str(node), {})})
        return out

    def warm_sandboxes(self, plugin_id: str) -> list[dict[str, Any]]:
        redis = self.client.redis
        found = []
        for instance_id in sorted(redis.smembers(self.keys.instances_of(plugin_id)))[:50]:
            for raw in redis.hgetall(self.keys.warm_sandboxes(str(instance_id))).values():
                found.append({"instance_id": str(instance_id), **json.loads(raw)})
        return found

    # -- actions ------------------------------------------------------------------------

    def post(self, path: str, body: dict[str, Any], actor: Actor) -> dict[str, Any]:
        parts = [unquote(part) for part in path.strip("/").split("/")[1:]]
        client = self.client
        if len(parts) == 3 and parts[0] == "plugins":
            plugin_id, action = parts[1], parts[2]
            plugin_actions: dict[str, Callable[[], dict[str, Any]]] = {
                "disable": lambda: client.disable(plugin_id, actor=actor),
                "enable": lambda: client.enable(plugin_id, actor=actor),
                "drain": lambda: client.drain(plugin_id, actor=actor),
                "purge": lambda: client.purge(plugin_id, actor=actor),
                "breaker-reset": lambda: client.reset_breaker(plugin_id, actor=actor),
                "breaker-force-open": lambda: client.force_open_breaker(plugin_id,
                                                                        actor=actor),
            }
            if action in plugin_actions:
                return plugin_actions[action]()
        if len(parts) == 3 and parts[0] == "jobs" and parts[2] == "cancel":
            of = body.get("plugin_id")
            return client.cancel(parts[1], actor=actor, plugin_id=str(of) if of else None)
        if len(parts) == 3 and parts[0] == "deadletters":
            if parts[2] == "requeue":
                return client.requeue_dead_letter(parts[1], actor=actor)
            if parts[2] == "discard":
                return client.discard_dead_letter(parts[1], actor=actor)
        raise NotFound(path)
