"""Importing a plugin's entrypoint and checking its `requires`, in the process that runs it.

Both failures are `dependency` errors: retrying cannot help, so they are never retried.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Callable, Iterable
from typing import Any

from packaging.requirements import Requirement

from pluginpool.policy.errors import ErrorType, PluginExecutionError
from pluginpool.pool.sandbox.runtime.classify import describe, type_name
from pluginpool.pool.shutdown_exit import is_pool_shutdown
from pluginpool.tasks.spec import PluginSpec

PluginFunction = Callable[..., Any]


def add_plugin_paths(paths: Iterable[str]) -> None:
    """Make the deployment's plugin directories importable (settings.plugin_paths)."""
    for path in paths:
        if path and path not in sys.path:
            sys.path.insert(0, path)


def unmet_packages(requirements: Iterable[str]) -> list[dict[str, str]]:
    """Each PEP 508 requirement not satisfied by the installed distributions, with why."""
    unmet = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append({"requirement": text, "installed": "none"})
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            unmet.append({"requirement": text, "installed": installed})
    return unmet


def check_requires(spec: PluginSpec, *, registered: Callable[[str], bool],
                   packages_here: bool = True) -> None:
    """Raise a `dependency` error when a required package or plugin is missing.
    `packages_here=False`: the packages come from the revision's own environment (a
    sandbox installs them), so only the plugins are checked."""
    packages = unmet_packages(spec.requires.packages) if packages_here else []
    plugins = [plugin for plugin in spec.requires.plugins if not registered(plugin)]
    if packages or plugins:
        raise PluginExecutionError.of(
            ErrorType.DEPENDENCY,
            "requirements not met",
            plugin_id=spec.id,
            unmet_packages=packages,
            unmet_plugins=plugins,
        )


def import_entrypoint(spec: PluginSpec) -> PluginFunction:
    """Import `module:function`; any failure of the module's import is a `dependency` error."""
    module_name, _, attr = spec.entrypoint.partition(":")
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # a plugin module may raise anything, even SystemExit or
        # KeyboardInterrupt (a pool process ignores SIGINT: it can only be the module's)
        if is_pool_shutdown(exc):
            raise  # the pool is ending this process: not the module's failure
        raise PluginExecutionError.of(
            ErrorType.DEPENDENCY, f"cannot import {module_name!r}: {describe(exc)}",
            plugin_id=spec.id,
            entrypoint=spec.entrypoint,
            exception_type=type_name(exc),
        ) from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise PluginExecutionError.of(
            ErrorType.DEPENDENCY,
            f"{spec.entrypoint!r} is not a callable in the module",
            plugin_id=spec.id,
            entrypoint=spec.entrypoint,
        )
    return function  # type: ignore[no-any-return]


class PluginLoader:
    """Caches the loaded entrypoint per (plugin, revision) within one process."""

    def __init__(self, *, registered: Callable[[str], bool]) -> None:
        self._registered = registered
        self._loaded: dict[tuple[str, int], PluginFunction] = {}

    def load(self, spec: PluginSpec) -> PluginFunction:
        key = (spec.id, spec.revision)
        function = self._loaded.get(key)
        if function is None:
            check_requires(spec, registered=self._registered)
            function = import_entrypoint(spec)
            self._loaded[key] = function
        return function
