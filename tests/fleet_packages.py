"""Small plugin packages (and packages plugins require) written into temporary directories
and built into wheels offline, for the fleet and environment tests.

Nothing here is on a worker's plugin path: the code reaches workers only as artifacts.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from pluginpool.tasks.artifacts import build_wheel

PACKAGE = "fleetpkg"


def write_package(root: Path, *, version: int) -> Path:
    """`root/fleetpkg`, a bare package whose plugins report `version`."""
    package = root / PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(
        "import time\n"
        f"VERSION = {version}\n\n\n"
        "def run(ctx, payload):\n"
        "    text = str((payload or {}).get('text', ''))\n"
        "    return {'version': VERSION, 'words': len(text.split())}\n\n\n"
        "def nap(ctx, payload):\n"
        "    time.sleep(float((payload or {}).get('seconds', 0)))\n"
        "    return {'version': VERSION}\n", encoding="utf-8")
    return package


def wheel_of(root: Path, *, version: int) -> Path:
    """A wheel of the package at `version`, built offline into `root`."""
    package = write_package(root / f"src-v{version}", version=version)
    work = root / f"build-v{version}"
    work.mkdir(parents=True, exist_ok=True)
    return build_wheel(package, plugin_id=f"fleet-v{version}", version=f"{version}.0",
                       work_dir=work)


def dependency_wheel(root: Path, *, version: str, name: str = "ppdemo_dep") -> Path:
    """A wheel of the distribution `name` at `version`, a module whose `VERSION` says which
    it is: what plugins list in `requires.packages`. Built offline into `root`."""
    project = root / f"{name}-{version}-src"
    (project / name).mkdir(parents=True, exist_ok=True)
    (project / name / "__init__.py").write_text(f"VERSION = {version!r}\n", encoding="utf-8")
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=70.1"]\n'
        'build-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{name}"\nversion = "{version}"\n', encoding="utf-8")
    work = root / f"{name}-{version}-build"
    work.mkdir(parents=True, exist_ok=True)
    return build_wheel(project, plugin_id=name.replace("_", "-"), version=version,
                       work_dir=work)


def variant(wheel: Path, out: Path, *, tag: str) -> Path:
    """The same wheel with a zip comment: same code, another sha256 (a fresh artifact)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    data = io.BytesIO(wheel.read_bytes())
    with zipfile.ZipFile(data, "a") as archive:
        archive.comment = tag.encode()
    out.write_bytes(data.getvalue())
    return out


def manifest(path: Path, plugins: dict[str, dict[str, object]]) -> Path:
    """A TOML manifest of `[plugins.<id>]` tables (string, number and bool values, lists,
    and inline tables given as dicts)."""
    def value(item: object) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int | float):
            return str(item)
        if isinstance(item, dict):
            return "{ " + ", ".join(f"{k} = {value(v)}" for k, v in item.items()) + " }"
        if isinstance(item, list | tuple):
            return "[" + ", ".join(value(v) for v in item) + "]"
        return '"' + str(item).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = []
    for plugin_id, table in plugins.items():
        lines.append(f"[plugins.{plugin_id}]")
        lines.extend(f"{key} = {value(item)}" for key, item in table.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
