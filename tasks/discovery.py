"""Plugins declared by installed distributions, found through their entry points.

A distribution declares each plugin as an entry point in the group `pluginpool.plugins`:
the entry point's name is the plugin id and its value the plugin's entrypoint
(`module:function`). Its manifest data (limits, isolation, permissions, requires...) is
the `[plugins.<id>]` table of a `pluginpool.toml` file the distribution ships anywhere in
its files (usually as package data next to its code), in the manifest format; without
one, the plugin gets the deployment's defaults. `name` defaults to the id, `version` to
the distribution's version, and `entrypoint` is always the entry point's value.

Found with importlib.metadata (pluggy and stevedore build on the same; the file is read
from the distribution's RECORD, so discovery never imports plugin code).
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from dataclasses import dataclass
from typing import Any

from pluginpool.policy.errors import ManifestError, ManifestIssue
from pluginpool.tasks.manifest import parse_manifest
from pluginpool.tasks.spec import PluginSpec

ENTRY_POINT_GROUP = "pluginpool.plugins"
MANIFEST_FILE = "pluginpool.toml"


@dataclass(frozen=True)
class DiscoveredPlugin:
    """One plugin an installed distribution declares."""

    spec: PluginSpec
    distribution: str
    distribution_version: str
    manifest_file: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.spec.id, "version": self.spec.version,
                "entrypoint": self.spec.entrypoint, "distribution": self.distribution,
                "distribution_version": self.distribution_version,
                "manifest_file": self.manifest_file}


def discover(paths: list[str] | None = None) -> list[DiscoveredPlugin]:
    """Every plugin declared by the distributions on `paths` (default: sys.path), sorted
    by id; the first distribution on the path wins a duplicated id. Raises ManifestError
    listing every problem in their manifest data."""
    found: dict[str, DiscoveredPlugin] = {}
    issues: list[ManifestIssue] = []
    dists = (importlib.metadata.distributions(path=paths) if paths is not None
             else importlib.metadata.distributions())
    for dist in dists:
        entry_points = [ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]
        if not entry_points:
            continue
        dist_name = dist.metadata["Name"] or "?"
        tables, manifest_file = _manifest_tables(dist, issues)
        for ep in entry_points:
            if ep.name in found:
                continue
            table = {"name": ep.name, "version": dist.version,
                     **tables.get(ep.name, {}), "entrypoint": ep.value}
            origin = f"{dist_name} (entry point {ep.name})"
            try:
                [spec] = parse_manifest({"plugins": {ep.name: table}}, file=origin)
            except ManifestError as exc:
                issues.extend(exc.issues)
                continue
            found[ep.name] = DiscoveredPlugin(spec=spec, distribution=dist_name,
                                              distribution_version=dist.version,
                                              manifest_file=manifest_file)
    if issues:
        raise ManifestError(issues)
    return [found[pid] for pid in sorted(found)]


def _manifest_tables(dist: importlib.metadata.Distribution,
                     issues: list[ManifestIssue]) -> tuple[dict[str, Any], str | None]:
    """The `[plugins.<id>]` tables of the distribution's pluginpool.toml, if it has one."""
    for file in dist.files or []:
        if file.name != MANIFEST_FILE:
            continue
        where = str(file.locate())
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            issues.append(ManifestIssue(file=where, plugin_id=None, field="<toml>",
                                        problem=str(exc)))
            return {}, where
        tables = raw.get("plugins", {})
        return (tables if isinstance(tables, dict) else {}), where
    return {}, None


def select(found: list[DiscoveredPlugin], names: list[str] | None) -> list[PluginSpec]:
    """The specs of the named plugins (all when `names` is empty or None)."""
    by_id = {plugin.spec.id: plugin.spec for plugin in found}
    if not names:
        return list(by_id.values())
    missing = [name for name in names if name not in by_id]
    if missing:
        raise ManifestError([ManifestIssue(
            file="<entry points>", plugin_id=name, field="<entry point>",
            problem=f"no installed distribution declares {name!r} in the"
                    f" {ENTRY_POINT_GROUP!r} entry-point group") for name in missing])
    return [by_id[name] for name in names]
