"""Every Redis key pluginpool uses, under one prefix (default `pluginpool:`).

One place so that operators can find, size and clean pluginpool's data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    """Key names for one deployment, derived from its prefix."""

    prefix: str = "pluginpool:"
    channel_scope: str = ""
    """Between the prefix and a pub/sub channel's name: `db<N>:` for a deployment on
    database N > 0 (Settings.keys). Keys live in one database, but channels are the whole
    server's: without it, deployments on two databases of one server would hear each
    other's registry changes, operator actions, breaker transitions and errors."""

    @property
    def specs(self) -> str:
        """Hash: plugin id → current spec JSON (with its registry revision)."""
        return f"{self.prefix}registry:specs"

    def spec_history(self, plugin_id: str) -> str:
        """List: past spec JSONs of one plugin, newest first, bounded."""
        return f"{self.prefix}registry:history:{plugin_id}"

    def instance(self, instance_id: str) -> str:
        """Hash: one loaded plugin instance (plugin id, initial data, created at)."""
        return f"{self.prefix}instance:{instance_id}"

    def instances_of(self, plugin_id: str) -> str:
        """Set: ids of the loaded instances of one plugin."""
        return f"{self.prefix}instances:{plugin_id}"

    @property
    def dead_letter(self) -> str:
        """Hash: dead-letter id → entry JSON (reason, queue, raw message, delivery history)."""
        return f"{self.prefix}deadletter"

    @property
    def dead_letter_index(self) -> str:
        """Sorted set: dead-letter id → when it was set aside; bounds the list (oldest go)."""
        return f"{self.prefix}deadletter:index"

    @property
    def quarantine_pending(self) -> str:
        """Set: dead-letter ids the poison rule quarantined whose job's failure is not yet
        stored (claim.lua adds, the worker removes once stored, sweeps retry)."""
        return f"{self.prefix}deadletter:outcome-pending"

    @property
    def deliveries(self) -> str:
        """Hash: delivery tag → deliveries without an outcome (and `<tag>|t`: first one).

        Part of the unacknowledged record: the poison rule reads it at every claim."""
        return f"{self.prefix}delivery:count"

    @property
    def delivery_owner(self) -> str:
        """Hash: delivery tag → the consumer (worker process) holding it now."""
        return f"{self.prefix}delivery:owner"

    @property
    def held_prefix(self) -> str:
        """Prefix of per-consumer sets: the delivery tags one consumer holds unacknowledged."""
        return f"{self.prefix}delivery:held:"

    @property
    def consumers(self) -> str:
        """Sorted set: consumer id → its last heartbeat (seconds since the epoch)."""
        return f"{self.prefix}delivery:consumers"

    @property
    def ready_prefix(self) -> str:
        """Prefix of per-group sorted sets: the queue lists that may hold a message, in the
        order the group serves them (the ready index)."""
        return f"{self.prefix}delivery:ready:"

    @property
    def wake_prefix(self) -> str:
        """Prefix of per-group wake-up lists an idle group blocks on; bounded tokens."""
        return f"{self.prefix}delivery:wake:"

    @property
    def waiters_prefix(self) -> str:
        """Prefix of per-queue sets: the worker groups consuming that queue."""
        return f"{self.prefix}delivery:waiters:"

    @property
    def consumes_prefix(self) -> str:
        """Prefix of per-consumer sets: the queue lists one consumer consumes."""
        return f"{self.prefix}delivery:consumes:"

    @property
    def delivery_stats(self) -> str:
        """Hash: counters of the delivery path (dead letters, late acknowledgements...)."""
        return f"{self.prefix}delivery:stats"

    def breaker(self, plugin_id: str) -> str:
        """Hash: one plugin's breaker state, window counters and trial permits."""
        return f"{self.prefix}breaker:{plugin_id}"

    def breaker_window(self, plugin_id: str) -> str:
        """List (count window) or sorted set (time window) of recent outcomes."""
        return f"{self.prefix}breaker:{plugin_id}:window"

    def breaker_window_failed(self, plugin_id: str) -> str:
        return f"{self.prefix}breaker:{plugin_id}:window:failed"

    def breaker_window_slow(self, plugin_id: str) -> str:
        return f"{self.prefix}breaker:{plugin_id}:window:slow"

    def breaker_history(self, plugin_id: str) -> str:
        """List: the last 50 transitions of one plugin's breaker, newest first."""
        return f"{self.prefix}breaker:{plugin_id}:history"

    @property
    def breaker_channel(self) -> str:
        """Pub/sub channel: every breaker transition, as JSON."""
        return f"{self.prefix}{self.channel_scope}events:breaker"

    @property
    def error_channel(self) -> str:
        """Pub/sub channel: every failed run, as a JSON error event."""
        return f"{self.prefix}{self.channel_scope}events:errors"

    def storage(self, scope: str) -> str:
        """Hash: one instance's (or plugin's) persistent key-value store."""
        return f"{self.prefix}storage:{scope}"

    def storage_used(self, scope: str) -> str:
        """Counter: bytes used by that store, held under max_storage_kb."""
        return f"{self.prefix}storage:{scope}:used"

    def instance_usage(self, instance_id: str) -> str:
        """Hash: an instance's resource usage totals and its last run."""
        return f"{self.prefix}instance:{instance_id}:usage"

    def instance_errors(self, instance_id: str) -> str:
        """List: an instance's recent errors, newest first, bounded."""
        return f"{self.prefix}instance:{instance_id}:errors"

    def warm_sandboxes(self, instance_id: str) -> str:
        """Hash: `<worker>/<zygote pid>` → one warm sandbox of the instance (JSON), written
        by the pool process that holds it; expires unless refreshed."""
        return f"{self.prefix}instance:{instance_id}:warm"

    @property
    def unload_channel(self) -> str:
        """Pub/sub channel: ids of unloaded instances, so every worker retires their warm
        sandboxes (running their teardown) at once."""
        return f"{self.prefix}{self.channel_scope}events:unload"

    def health(self, plugin_id: str) -> str:
        """Hash: a plugin's durable health figures (runs, outcomes, latency, usage)."""
        return f"{self.prefix}health:{plugin_id}"

    def health_minute_prefix(self, plugin_id: str) -> str:
        """Prefix of per-minute hashes (runs, failures, restarts, latency); expire in 1 h."""
        return f"{self.prefix}health:{plugin_id}:m:"

    def recent_errors(self, plugin_id: str) -> str:
        """List: a plugin's last 20 error events, newest first."""
        return f"{self.prefix}health:{plugin_id}:errors"

    @property
    def workers(self) -> str:
        """Hash: worker node → its last heartbeat, pid, host and the digest of its queues
        (written by each worker every few seconds; small whatever its plugin count)."""
        return f"{self.prefix}workers"

    @property
    def worker_queues(self) -> str:
        """Hash: worker node → JSON list of the queues it consumes, written only when the
        list changes (its digest rides on every heartbeat in `workers`)."""
        return f"{self.prefix}workers:queues"

    def spec_revisions(self, plugin_id: str) -> str:
        """List: one record per revision of a plugin (revision, version, source hash, when,
        by whom, action), oldest first, bounded; the spec contents live in spec_history."""
        return f"{self.prefix}registry:revisions:{plugin_id}"

    @property
    def unregistered(self) -> str:
        """Hash: plugin id → the last revision it had when it was unregistered."""
        return f"{self.prefix}registry:unregistered"

    @property
    def registry_version(self) -> str:
        """Counter: bumped in the same transaction as every registry change, so a worker
        can tell in one read that nothing changed (no re-read of 10,000 specs)."""
        return f"{self.prefix}registry:version"

    @property
    def registry_channel(self) -> str:
        """Pub/sub channel: every registry change (register, unregister, rollback), as JSON;
        workers follow it to start and stop consuming queues."""
        return f"{self.prefix}{self.channel_scope}events:registry"

    def artifact(self, sha256: str) -> str:
        """String: a plugin's code artifact (a wheel), content-addressed by its sha256."""
        return f"{self.prefix}artifact:{sha256}"

    @property
    def paused(self) -> str:
        """Hash: plugin id → why its submits are refused (JSON: mode disabled or draining,
        by, at); workers stop consuming a disabled plugin's queue."""
        return f"{self.prefix}ops:paused"

    @property
    def ops_channel(self) -> str:
        """Pub/sub channel: operator actions workers act on at once (disable, enable)."""
        return f"{self.prefix}{self.channel_scope}events:ops"

    def cancelled(self, job_id: str) -> str:
        """String: set when an operator cancels the job (JSON: by, reason); expires with the
        job's result. Checked by the worker before and after a run."""
        return f"{self.prefix}ops:cancelled:{job_id}"

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel: ids of cancelled jobs; the worker running one kills its run."""
        return f"{self.prefix}{self.channel_scope}events:cancel"

    @property
    def audit(self) -> str:
        """List: operator actions (who, what, when, from where, outcome), newest first,
        bounded (tasks/audit.py)."""
        return f"{self.prefix}audit"

    def job_status(self, job_id: str) -> str:
        """Hash: the job's status changes by sequence number (JSON: status, seq, at, ...);
        expires with its result (tasks/job_status.py)."""
        return f"{self.prefix}job:{job_id}:status"

    def job_channel(self, job_id: str) -> str:
        """Pub/sub channel: the job's status changes as they happen, one message each."""
        return f"{self.prefix}{self.channel_scope}events:job:{job_id}"

    def recent_runs(self, plugin_id: str) -> str:
        """List: a plugin's last runs (outcome, duration, worker, bounded logs), newest
        first, bounded (tasks/runs.py)."""
        return f"{self.prefix}health:{plugin_id}:runs"
