"""Loading a plugin inside the zygote: its entrypoint, its setup and its operations.

`module:function` is a plugin with one operation, `run`. `module:Class` is set up once per
warm sandbox (`Class(ctx)`); the methods named in the manifest's `operations` are its
operations, each called as `method(ctx, payload)`; `close()`, if defined, is its teardown.
"""

from __future__ import annotations

import importlib

from .classify import describe, type_name
from .messages import DEPENDENCY, RUNTIME, RunError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Operation = Callable[[Any, Any], Any]


class LoadError(Exception):
    """The plugin cannot be loaded (import, shape): a `dependency` error."""

    def __init__(self, error: RunError) -> None:
        self.error = error
        super().__init__(error.message)


def import_target(entrypoint: str) -> Any:
    module_name, _, attr = entrypoint.partition(":")
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # a plugin module may raise anything, even SystemExit
        raise LoadError(RunError(DEPENDENCY, f"cannot import {module_name!r}: {describe(exc)}",
                                 {"entrypoint": entrypoint,
                                  "exception_type": type_name(exc)})) from None
    target = getattr(module, attr, None)
    if not callable(target):
        raise LoadError(RunError(DEPENDENCY, f"{entrypoint!r} is not a callable in the module",
                                 {"entrypoint": entrypoint}))
    return target


class LoadedPlugin:
    """The set-up plugin: its operations by name and its teardown."""

    def __init__(self, target: Any, operations: list[str], setup_ctx: Any) -> None:
        self.instance: Any = None
        self.operations: dict[str, Operation] = {}
        self.missing: dict[str, RunError] = {}
        """Listed operations the plugin does not have: each fails alone, when called (as
        in the pool child), not every operation at the setup."""
        if isinstance(target, type):
            factory: Any = target
            self.instance = factory(setup_ctx)  # the setup; raises are setup failures
            for name in operations:
                method, raised = read_operation(self.instance, name)
                if raised is not None:
                    self.missing[name] = RunError(
                        RUNTIME, f"reading operation {name!r} raised {describe(raised)}",
                        {"operation": name, "exception_type": type_name(raised)})
                elif not name.startswith("_") and callable(method):
                    self.operations[name] = method
                else:
                    self.missing[name] = RunError(
                        DEPENDENCY, f"operation {name!r} is not a method of the plugin class",
                        {"operation": name, "operation_missing": True})
        else:
            self.operations["run"] = target
            for name in operations:
                if name != "run":
                    self.missing[name] = RunError(
                        DEPENDENCY, "a function entrypoint has the one operation 'run'",
                        {"operation": name, "operation_missing": True})

    def operation(self, name: str) -> Operation:
        """The operation called `name`; LoadError if the plugin does not have it."""
        found = self.operations.get(name)
        if found is None:
            raise LoadError(self.missing.get(name) or RunError(
                DEPENDENCY, f"no operation {name!r}",
                {"operation": name, "operation_missing": True}))
        return found

    def close(self) -> bool:
        """The teardown, when the class defines one; whether there was one."""
        close = getattr(self.instance, "close", None) if self.instance is not None else None
        if callable(close):
            close()
            return True
        return False


def read_operation(instance: Any, name: str) -> tuple[Any, BaseException | None]:
    """A listed operation's attribute, read once, for both runners: (value, None); (None,
    None) when it is absent (an AttributeError for a name neither the instance nor its
    classes hold: a __getattr__ that does not know it); (None, exc) when reading it raised
    (a property, an AttributeError inside one included): that operation fails alone, not
    the setup."""
    declared = _declared(instance, name)
    try:
        return getattr(instance, name), None
    except BaseException as exc:  # plugin code: anything
        if issubclass(type(exc), AttributeError) and not declared:
            return None, None
        return None, exc


def _declared(instance: Any, name: str) -> bool:
    """The attribute is in the instance's or its class's dictionaries, read without running
    plugin code (no `inspect` here: each module a zygote imports costs every run); False
    when that cannot be told."""
    try:
        own = object.__getattribute__(instance, "__dict__")
        if isinstance(own, dict) and name in own:
            return True
    except BaseException:  # no __dict__ (slots), or plugin code
        pass
    try:
        for klass in type.__dict__["__mro__"].__get__(type(instance)):
            if name in type.__dict__["__dict__"].__get__(klass):
                return True
    except BaseException:  # plugin code
        return False
    return False
