"""Plugin specs: what a plugin is, what it may use, how it is isolated, what it falls back to."""

from __future__ import annotations

import re
from typing import Any, Literal

from packaging.requirements import InvalidRequirement, Requirement
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pluginpool.policy.breaker import BreakerConfig
from pluginpool.policy.deadlines import Deadlines
from pluginpool.policy.limits import IsolationConfig, Permissions, ResourceLimits

PLUGIN_ID_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
ENTRYPOINT_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
OPERATION_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
"""Used with fullmatch at register: `$` would let a trailing newline through, `\\w` any
Unicode letter."""
STORED_OPERATION_PATTERN = re.compile(r"^[A-Za-z]\w{0,63}$")
"""What registered before 3 December: a stored spec is still read (and so can be
unregistered, and workers still start) with it."""
RESERVED_OPERATIONS = frozenset(("close",))
"""`close` is the teardown, never an operation a job can call."""
REGISTERING = "registering"
"""Validation context key: the spec is being registered (the stricter rules apply)."""


class Requires(BaseModel):
    """What a plugin needs: Python distributions (PEP 508) and other registered plugins."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    packages: list[str] = Field(default_factory=list)
    plugins: list[str] = Field(default_factory=list)

    @field_validator("packages")
    @classmethod
    def _pep508(cls, values: list[str], info: ValidationInfo) -> list[str]:
        registering = bool(info.context and info.context.get(REGISTERING))
        for value in values:
            try:
                requirement = Requirement(value)
            except InvalidRequirement as exc:
                raise ValueError(f"{value!r} is not a PEP 508 requirement: {exc}") from None
            if registering and requirement.url:  # workers refuse it (it would bypass the
                raise ValueError(  # deployment's package sources): refused here, not at run
                    f"{value!r} names a URL: packages come from the deployment's index and "
                    "find-links only")
        return values


class Fallback(BaseModel):
    """What a refused dispatch returns instead: a fixed value, or another plugin's result."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["value", "plugin"]
    value: Any = None
    plugin: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _infer_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kind" not in data:
            if "plugin" in data:
                return {"kind": "plugin", **data}
            if "value" in data:
                return {"kind": "value", **data}
        return data

    @model_validator(mode="after")
    def _plugin_named(self) -> Fallback:
        if self.kind == "plugin" and not self.plugin:
            raise ValueError("a plugin fallback needs `plugin`")
        return self


class ArtifactRef(BaseModel):
    """A plugin's code published beside its spec: a wheel in Redis, named by its sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    filename: str = Field(min_length=1, max_length=255, description="The wheel's file name.")


class PluginSpec(BaseModel):
    """Everything a producer and a worker need to know about one plugin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=PLUGIN_ID_PATTERN)
    name: str = Field(min_length=1, max_length=200)
    version: str = Field(default="0.0.0", min_length=1, max_length=64)
    entrypoint: str
    resource_limits: ResourceLimits = Field(default_factory=ResourceLimits)
    isolation: IsolationConfig = Field(default_factory=IsolationConfig)
    permissions: Permissions = Field(default_factory=Permissions)
    requires: Requires = Field(default_factory=Requires)
    fallback: Fallback | None = None
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    operations: list[str] = Field(
        default_factory=lambda: ["run"], min_length=1, max_length=64,
        description="The methods of a class entrypoint a job may call by name; a function "
                    "entrypoint has the one operation `run`.")
    source: str | None = Field(
        default=None, description="Where `register` took the code from: a package directory"
        " or a .whl (absolute once the manifest is read); built and published as `artifact`.")
    artifact: ArtifactRef | None = None
    revision: int = Field(default=0, ge=0, description="Set by the registry on publish.")

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint_shape(cls, value: str) -> str:
        if not ENTRYPOINT_PATTERN.match(value):
            raise ValueError("must be 'package.module:function' or 'package.module:Class'")
        return value

    @field_validator("operations")
    @classmethod
    def _operation_names(cls, values: list[str], info: ValidationInfo) -> list[str]:
        registering = bool(info.context and info.context.get(REGISTERING))
        for value in values:
            if not (OPERATION_PATTERN.fullmatch(value) if registering
                    else STORED_OPERATION_PATTERN.match(value)):
                raise ValueError(f"{value!r} is not an operation name (a public method name)")
            if registering and value in RESERVED_OPERATIONS:
                raise ValueError(f"{value!r} is the teardown, not an operation")
        if len(set(values)) != len(values):
            raise ValueError("operations are listed more than once")
        return values

    def offers(self, operation: str) -> bool:
        """Whether a job may call `operation`: listed, and not the teardown (a spec stored
        before `close` was refused at register may still list it)."""
        return operation in self.operations and operation not in RESERVED_OPERATIONS

    @property
    def deadlines(self) -> Deadlines:
        """Every clock of one job of this plugin (policy/deadlines.py)."""
        limits = self.resource_limits
        return Deadlines.of(timeout_ms=limits.timeout_ms,
                            setup_timeout_ms=limits.setup_timeout_ms,
                            sandboxed=self.isolation.sandboxed)

    @property
    def default_open_ms(self) -> int:
        """The breaker's first wait when the spec sets none: the restart cooldown."""
        return max(self.isolation.restart_cooldown_ms, 1)

    @property
    def queue(self) -> str:
        """The plugin's own queue."""
        return f"plugins.{self.id}"

    @property
    def task_name(self) -> str:
        """The plugin's own task name, so Flower shows each plugin as its own task."""
        return f"plugin.{self.id}"

    def with_defaults(self, *, limits: ResourceLimits, isolation: IsolationConfig,
                      breaker: BreakerConfig | None = None) -> PluginSpec:
        """Fill every limit and isolation field the spec did not set from the deployment's."""
        def merged(own: BaseModel, default: BaseModel) -> dict[str, Any]:
            return {**default.model_dump(), **own.model_dump(include=own.model_fields_set)}

        return self.model_copy(update={
            "resource_limits": ResourceLimits(**merged(self.resource_limits, limits)),
            "isolation": IsolationConfig(**merged(self.isolation, isolation)),
            "breaker": BreakerConfig(**merged(self.breaker, breaker or BreakerConfig())),
        })

    def content_equals(self, other: PluginSpec) -> bool:
        """Same spec, ignoring the registry revision."""
        return self.model_dump(exclude={"revision"}) == other.model_dump(exclude={"revision"})
