"""All of pluginpool's settings, in one typed object read from `PLUGINPOOL_*` and `.env`.

No other module reads the environment: the settings object is passed around.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError as PydanticSettingsError
from redis.connection import parse_url

from pluginpool.policy.breaker import BreakerConfig
from pluginpool.policy.errors import SettingsError
from pluginpool.policy.health import HealthThresholds
from pluginpool.policy.keys import RedisKeys
from pluginpool.policy.limits import IsolationConfig, ResourceLimits
from pluginpool.tasks.payload import DEFAULT_MAX_PAYLOAD_DEPTH, MAX_PAYLOAD_DEPTH_CAP

ENV_PREFIX = "PLUGINPOOL_"
NOT_SETTINGS = frozenset({"PLUGINPOOL_TEST_REDIS_DB", "PLUGINPOOL_BENCH_REDIS_DB",
                          "PLUGINPOOL_CHAOS_SCALE", "PLUGINPOOL_SCREENSHOT_DIR"})
"""Variables of pluginpool's own tests and benchmarks: not settings, not warned of."""

logger = logging.getLogger("pluginpool.settings")
_warned: set[str] = set()


class Settings(BaseSettings):
    """One deployment's settings. Units are in the names."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
    )

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis for the registry, instances, breaker and health state.",
    )
    broker_url: str | None = Field(default=None, description="Celery broker; default redis_url.")
    result_backend: str | None = Field(
        default=None, description="Celery result backend; default redis_url."
    )
    key_prefix: str = Field(default="pluginpool:", min_length=1,
                            description="Prefix of every Redis key pluginpool writes.")
    default_limits: ResourceLimits = Field(
        default_factory=ResourceLimits,
        description="Limits for fields a spec leaves out (e.g. ..._DEFAULT_LIMITS__TIMEOUT_MS).")
    default_isolation: IsolationConfig = Field(
        default_factory=IsolationConfig, description="Isolation for fields a spec leaves out.")
    default_breaker: BreakerConfig = Field(
        default_factory=BreakerConfig, description="Breaker settings a spec leaves out.")
    breaker_enabled: bool = Field(
        default=True, description="Off: no breaker checks at all (benchmarks, trusted plugins).")
    breaker_gate_cache_ms: int = Field(
        default=1000, ge=0,
        description="How long a worker trusts the breaker state it last learned (not trials).")
    breaker_fail_mode: Literal["closed", "open"] = Field(
        default="closed",
        description="When the breaker's Redis is unreachable: refuse dispatch, or allow it.")
    usage_events: bool = Field(
        default=True, description="Send a task-plugin-usage Celery event after every run.")
    event_batch_ms: int = Field(
        default=50, ge=0, le=5_000,
        description="A worker's task events that follow one another within this window go "
                    "to Redis as one message (0: Celery's own, one per loop turn).")
    workspace_root: str | None = Field(
        default=None, description="Where run workspaces are made (default: the system temp).")
    warm_sandboxes: int = Field(
        default=4, ge=1, le=256,
        description="Warm sandboxes (set-up zygotes) each pool process keeps; the least "
                    "recently used is retired beyond it.")
    warm_idle_s: float = Field(
        default=300.0, gt=0, description="A warm sandbox unused this long is retired.")
    warm_root: str | None = Field(
        default=None,
        description="Where warm sandboxes keep their homes; sandboxed runs' workspaces are "
                    "made inside (default: pluginpool-warm in the system temp).")
    health: HealthThresholds = Field(
        default_factory=HealthThresholds, description="When a plugin counts as degraded.")
    worker_heartbeat_s: float = Field(
        default=5.0, gt=0, description="How often a worker records that it is alive.")
    result_expires_s: int = Field(default=86_400, ge=60,
                                  description="How long job results stay in the backend.")
    max_payload_bytes: int = Field(default=1_048_576, ge=64,
                                   description="Largest JSON payload (and initial_data) accepted.")
    max_payload_depth: int = Field(
        default=DEFAULT_MAX_PAYLOAD_DEPTH, ge=1, le=MAX_PAYLOAD_DEPTH_CAP,
        description="Deepest nesting of lists and objects accepted in a payload (and "
                    "initial_data), at submit and again in the worker. Encoders, decoders and "
                    "pickle recurse per level (pickle, which hands a job to a pool child, "
                    "fails near 500 levels inside a worker's call stack): at most 256.")
    max_result_bytes: int = Field(default=1_048_576, ge=64,
                                  description="Largest JSON result a plugin may return.")
    visibility_timeout_s: int = Field(
        default=3_600, ge=10,
        description="Redis broker visibility timeout; every hard time limit must be below it.")
    restore_sweep_s: float = Field(
        default=2.0, gt=0, le=60,
        description="How often each worker beats its consumer heartbeat and returns to their "
                    "queues the messages of consumers found dead (and of any holder past the "
                    "visibility timeout).")
    consumer_dead_after_s: float = Field(
        default=10.0, gt=0,
        description="A worker whose consumer heartbeat is older than this is dead: any live "
                    "worker returns the messages it held to the front of their queues. At "
                    "least 3 x restore_sweep_s. A worker paused longer than this (SIGSTOP, a "
                    "partition) finds its jobs run elsewhere: see the README on duplicates.")
    max_deliveries: int = Field(
        default=3, ge=1, le=100,
        description="The poison rule: a message delivered this many times without an outcome "
                    "(each time its worker died, or was declared dead, before finishing it) is "
                    "moved to the dead-letter list at its next claim instead of being "
                    "delivered again. A worker that hands a message back itself (a warm "
                    "shutdown, a requeue while Redis is away) does not count.")
    dead_letter_max: int = Field(
        default=10_000, ge=10,
        description="Most dead letters kept; beyond it the oldest are dropped.")
    broker_idle_wait_s: float = Field(
        default=0.2, ge=0.01, le=10,
        description="Where Redis keyspace notifications are unavailable: how long an idle "
                    "worker waits before rescanning its queues for jobs pushed by a producer "
                    "that does not index them (plain Celery or kombu). Each rescan reads the "
                    "length of every queue the worker consumes.")
    broker_keyspace_events: bool = Field(
        default=True,
        description="Let workers enable Redis keyspace notifications for list pushes "
                    "(notify-keyspace-events E and l), so a job from a plain Celery producer "
                    "reaches an idle worker at once, at a cost that does not grow with the "
                    "number of plugins.")
    broker_rescan_s: float = Field(
        default=60.0, gt=0,
        description="With keyspace notifications on: how long a worker's rolling rescan of "
                    "its queues takes for a full pass, a safety net for notifications lost. It "
                    "rechecks at most 8 queue lists a second, so a worker with more than "
                    "8 x this many lists (4 per queue) takes longer; every reconnect or "
                    "resubscribe triggers a full rescan at once.")
    spec_cache_ttl_s: float = Field(
        default=5.0, ge=0,
        description="How long a producer caches a spec (registry events drop it sooner). A "
                    "worker drops its cached specs on every registry change its follower "
                    "hears of, and keeps one at most max(this, 300 s).")
    plugin_paths: list[str] = Field(
        default_factory=list,
        description="Directories added to sys.path in workers, where plugin modules live; "
                    "a relative one is taken from the working directory at start.",
    )
    redis_sentinel_master: str | None = Field(
        default=None, description="Sentinel master name, for sentinel://host:port;... URLs.")
    redis_tls_ca_file: str | None = Field(
        default=None, description="CA bundle that verifies a rediss:// server's certificate.")
    redis_socket_timeout_s: float = Field(
        default=5.0, gt=0, description="Connect/read timeout for Redis, so outages fail fast.")
    http_idle_timeout_s: float = Field(
        default=30.0, gt=0, le=3600,
        description="The aggregator's HTTP server closes a connection that sends nothing (or "
                    "stops reading) for this long, so a slow or idle client cannot pin one of "
                    "its threads for good.")
    max_artifact_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1024,
        description="Largest plugin code artifact (wheel) `register` publishes into Redis.")
    artifact_cache_dir: str | None = Field(
        default=None,
        description="Where workers unpack artifacts, one directory per sha256 (default: "
                    "<system temp>/pluginpool-cache), and per-revision environments.")
    package_index_url: str | None = Field(
        default=None,
        description="The package index per-revision environments install requires.packages "
                    "from (default: the installer's own, PyPI); `none`: no index at all, only "
                    "find_links (an offline or private deployment).")
    find_links: list[str] = Field(
        default_factory=list,
        description="Wheel directories or URLs of flat pages of wheels (a JSON list) searched "
                    "for requires.packages besides the index.")
    env_install_timeout_s: float = Field(
        default=600.0, gt=0, le=86_400,
        description="Longest one environment install may take; a longer one is killed and "
                    "is a `dependency` error. It runs on even when the job that started it "
                    "stopped waiting, so a later job finds it done.")
    env_keep_s: float = Field(
        default=86_400.0, gt=0,
        description="A per-revision environment no registered revision uses, and unused "
                    "this long, is removed from the host's disk (a later job of that "
                    "revision installs it again).")
    env_sweep_s: float = Field(
        default=600.0, ge=0,
        description="How often each worker sweeps its host's unused environments; 0: never.")
    fleet_reconcile_s: float = Field(
        default=5.0, gt=0,
        description="How often a worker compares its queues with the registry, so one that "
                    "missed a registry event catches up on its own.")
    api_tokens: dict[str, Literal["viewer", "operator"]] = Field(
        default_factory=dict,
        description="Bearer tokens of the aggregator's HTTP API, as a JSON object token → "
                    "role (viewer reads; operator also acts). None: read-only, loopback only.")
    audit_max: int = Field(default=10_000, ge=10,
                           description="Most operator actions kept in the audit log.")
    max_log_bytes: int = Field(
        default=65_536, ge=1024, le=1_048_576,
        description="Most bytes of one run's logs (stdout, stderr, ctx.logger) kept: the "
                    "last ones, with the truncation marked.")
    run_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "OFF"] = Field(
        default="INFO", description="Level at which the worker logs each run's logs (and "
                                    "each success, without its value); OFF: not at all.")

    @field_validator("redis_url", "broker_url", "result_backend")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(
                ("redis://", "rediss://", "unix://", "sentinel://")):
            raise ValueError("must be a redis://, rediss://, unix:// or sentinel:// URL")
        if value is not None:
            try:
                database_of(value)
            except ValueError as exc:
                raise ValueError(f"not a Redis URL with a database number: {exc}") from exc
        return value

    @field_validator("plugin_paths")
    @classmethod
    def _absolute_paths(cls, value: list[str]) -> list[str]:
        """Made absolute here, from the process's working directory: a zygote works in its
        home, where a relative path would name nothing (sandboxed plugins then failed to
        import while unsandboxed ones worked)."""
        return [os.path.abspath(path) for path in value]

    @field_validator("package_index_url")
    @classmethod
    def _index_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if value.strip().lower() == "none":
            return "none"
        if not value.startswith(("http://", "https://", "file://")):
            raise ValueError("must be an http://, https:// or file:// URL, or none")
        return value

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Read the environment; an invalid value raises SettingsError naming the variable,
        and a PLUGINPOOL_* variable that names no setting is warned of (once a process)."""
        for problem in unknown_variables(os.environ):
            if problem not in _warned:
                _warned.add(problem)
                logger.warning("%s", problem)
        try:
            return cls(**overrides)
        except PydanticSettingsError as exc:  # a value not even parsed (JSON fields: "")
            match = re.search(r'field "(\w+)"', str(exc))
            name = f"{ENV_PREFIX}{match.group(1).upper()}" if match else "a PLUGINPOOL_* variable"
            raise SettingsError(f"invalid settings: {name}: not valid JSON for this setting "
                                "(an empty value included: unset it instead)") from None
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                field = "__".join(str(part) for part in err["loc"])
                problems.append(f"{ENV_PREFIX}{field.upper()}: {err['msg']}")
            raise SettingsError("invalid settings: " + "; ".join(problems)) from None

    @model_validator(mode="after")
    def _sentinel_needs_master(self) -> Settings:
        urls = (self.redis_url, self.broker_url or "", self.result_backend or "")
        if any(u.startswith("sentinel://") for u in urls) and not self.redis_sentinel_master:
            raise ValueError("sentinel:// URLs need PLUGINPOOL_REDIS_SENTINEL_MASTER")
        return self

    @model_validator(mode="after")
    def _heartbeat_fits(self) -> Settings:
        if self.consumer_dead_after_s < 3 * self.restore_sweep_s:
            raise ValueError("consumer_dead_after_s must be at least 3 x restore_sweep_s, or "
                             "one late sweep would declare a live worker dead")
        return self

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def effective_result_backend(self) -> str:
        return self.result_backend or self.redis_url

    @property
    def keys(self) -> RedisKeys:
        return _keys_of(self.key_prefix, self.redis_url)


@functools.lru_cache(maxsize=64)
def _keys_of(prefix: str, redis_url: str) -> RedisKeys:
    """Settings.keys, read several times a job: the URL parsed once."""
    db = database_of(redis_url)
    return RedisKeys(prefix, channel_scope=f"db{db}:" if db else "")


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """PLUGINPOOL_* variables that name no setting, each with the one it likely meant: a
    misspelt name is otherwise ignored without a word, and the default used in its place
    (PLUGINPOOL_REDIS_ULR: the deployment's data in database 0). A nested one
    (`FIELD__KEY`) with a known FIELD is checked by the settings themselves."""
    names = [f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields]
    problems = []
    for variable in sorted(environ):
        head = variable.split("__", 1)[0].upper()  # the settings' names are not case sensitive
        if not head.startswith(ENV_PREFIX) or head in NOT_SETTINGS or head in names:
            continue
        close = difflib.get_close_matches(  # on the part after the prefix all share
            head[len(ENV_PREFIX):], [name[len(ENV_PREFIX):] for name in names], n=1,
            cutoff=0.8)
        problems.append(f"{variable} is not a pluginpool setting (ignored)"
                        + (f"; did you mean {ENV_PREFIX}{close[0]}?" if close else ""))
    return problems


def database_of(url: str) -> int:
    """The database number a Redis URL selects (path `/N` or `?db=N`; 0 by default)."""
    if url.startswith("sentinel://"):
        first = urlparse(url.split(";")[0])
        query = dict(part.split("=", 1) for part in first.query.split("&") if "=" in part)
        return int(query.get("db") or first.path.lstrip("/") or 0)
    return int(parse_url(url).get("db") or 0)  # type: ignore[no-untyped-call]


def child_process_env(**extra: str) -> dict[str, str]:
    """The environment for a helper process pluginpool starts (e.g. `pip wheel`): this
    process's own, plus `extra`. Here so that no other module reads os.environ."""
    return {**os.environ, **extra}


def export_setting(name: str, value: str) -> None:
    """Set one setting for this process and every process it starts (the CLI's global
    options, e.g. --redis-url): the environment is where Settings.from_env looks."""
    os.environ[f"{ENV_PREFIX}{name.upper()}"] = value
