"""Reading a TOML manifest of plugin specs, all-or-nothing, with every problem listed."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pluginpool.policy.errors import ManifestError, ManifestIssue
from pluginpool.tasks.spec import REGISTERING, PluginSpec


def load_manifest(path: str | Path) -> list[PluginSpec]:
    """Parse `path` (`[plugins.<id>]` tables). Raises ManifestError listing every issue."""
    file = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError([ManifestIssue(file=file, plugin_id=None, field="<file>",
                                           problem=str(exc))]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError([ManifestIssue(file=file, plugin_id=None, field="<toml>",
                                           problem=str(exc))]) from None
    return parse_manifest(raw, file=file, base_dir=Path(path).resolve().parent)


def parse_manifest(raw: dict[str, Any], *, file: str = "<manifest>",
                   base_dir: Path | None = None) -> list[PluginSpec]:
    """Validate an already-decoded manifest; a relative `source` is taken from `base_dir`."""
    issues: list[ManifestIssue] = []
    unknown = sorted(set(raw) - {"plugins"})
    for key in unknown:
        issues.append(ManifestIssue(file=file, plugin_id=None, field=key,
                                    problem="unknown top-level key (expected [plugins.<id>])"))
    tables = raw.get("plugins")
    if not isinstance(tables, dict) or not tables:
        issues.append(ManifestIssue(file=file, plugin_id=None, field="plugins",
                                    problem="no [plugins.<id>] table"))
        raise ManifestError(issues)

    specs: list[PluginSpec] = []
    for plugin_id, table in tables.items():
        if not isinstance(table, dict):
            issues.append(ManifestIssue(file=file, plugin_id=plugin_id, field="<table>",
                                        problem="must be a table"))
            continue
        declared = table.get("id", plugin_id)
        if declared != plugin_id:
            issues.append(ManifestIssue(file=file, plugin_id=plugin_id, field="id",
                                        problem=f"{declared!r} differs from the table name"))
            continue
        source = table.get("source")
        if isinstance(source, str) and base_dir is not None:
            table = {**table, "source": str((base_dir / source).resolve())}
        try:
            specs.append(PluginSpec.model_validate({**table, "id": plugin_id}))
        except ValidationError as exc:
            for err in exc.errors():
                field = ".".join(str(part) for part in err["loc"]) or "<table>"
                issues.append(ManifestIssue(file=file, plugin_id=plugin_id, field=field,
                                            problem=err["msg"]))

    for spec in specs:
        if spec.fallback and spec.fallback.plugin == spec.id:
            issues.append(ManifestIssue(file=file, plugin_id=spec.id, field="fallback.plugin",
                                        problem="a plugin cannot fall back to itself"))
    if issues:
        raise ManifestError(issues)
    return specs


def spec_issues(spec: PluginSpec, source: str) -> list[ManifestIssue]:
    """A spec built without validation (model_construct, model_copy(update=...)) checked as
    a manifest's is, so a limit the kernel or Redis cannot honour is refused at register,
    with its field named, and never reaches a worker."""
    try:
        PluginSpec.model_validate(spec.model_dump(), context={REGISTERING: True})
    except ValidationError as exc:
        return [ManifestIssue(file=source, plugin_id=spec.id,
                              field=".".join(str(part) for part in err["loc"]) or "<spec>",
                              problem=err["msg"]) for err in exc.errors()]
    return []
