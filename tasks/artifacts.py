"""Code that travels with the spec: a plugin's package built into a wheel and published in
Redis, content-addressed by sha256, beside the spec that names it.

`register` builds a manifest entry's `source` (a project directory with a pyproject.toml
or setup.py, a bare package directory with an `__init__.py`, or a ready `.whl`) with
`pip wheel --no-deps --no-build-isolation --no-index`: pip is in every environment that
has pluginpool, those three flags make the build offline (the build backend must be
installed, which pluginpool's own setuptools dependency covers for setuptools projects
and bare packages), and `SOURCE_DATE_EPOCH` makes the wheel byte-for-byte reproducible,
so registering unchanged code again keeps the plugin's revision. The source is copied to
a scratch directory first, so the build never writes into the user's tree.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import redis
from packaging.version import InvalidVersion, Version

from pluginpool.policy.errors import ArtifactError, ArtifactTooLargeError
from pluginpool.policy.keys import RedisKeys
from pluginpool.tasks.redis_conn import redis_client
from pluginpool.tasks.settings import Settings, child_process_env
from pluginpool.tasks.spec import ArtifactRef, PluginSpec

REPRODUCIBLE_EPOCH = "315532800"
"""1980-01-01, the earliest time a zip entry can hold: every build stamps the same time."""
BUILD_TIMEOUT_S = 300
IGNORED = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                 ".git", ".venv", ".mypy_cache", ".pytest_cache")


class ArtifactStore:
    """Artifacts in Redis, one string per sha256 (never rewritten: same bytes, same key)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, *, max_bytes: int) -> None:
        self._redis = client  # binary: decode_responses=False
        self._keys = keys
        self.max_bytes = max_bytes

    @classmethod
    def from_settings(cls, settings: Settings) -> ArtifactStore:
        return cls(redis_client(settings, decode_responses=False), settings.keys,
                   max_bytes=settings.max_artifact_bytes)

    def publish(self, data: bytes, *, plugin_id: str, filename: str) -> ArtifactRef:
        if len(data) > self.max_bytes:
            raise ArtifactTooLargeError(plugin_id=plugin_id, size_bytes=len(data),
                                        limit_bytes=self.max_bytes)
        sha256 = hashlib.sha256(data).hexdigest()
        self._redis.set(self._keys.artifact(sha256), data, nx=True)
        return ArtifactRef(sha256=sha256, size_bytes=len(data), filename=filename)

    def fetch(self, ref: ArtifactRef, *, plugin_id: str) -> bytes:
        """The artifact's bytes, verified against the sha256 the spec recorded."""
        data = self._redis.get(self._keys.artifact(ref.sha256))
        if isinstance(data, str):  # a client that decodes responses: not for artifacts
            raise TypeError("ArtifactStore needs a Redis client with decode_responses=False")
        if data is None:
            raise ArtifactError("missing", f"artifact {ref.sha256} of {plugin_id!r} is not in"
                                " Redis: register the plugin again", plugin_id=plugin_id,
                                sha256=ref.sha256)
        observed = hashlib.sha256(data).hexdigest()
        if observed != ref.sha256:
            raise ArtifactError("hash_mismatch", f"artifact of {plugin_id!r} does not match"
                                f" its sha256 (expected {ref.sha256}, got {observed})",
                                plugin_id=plugin_id, sha256=ref.sha256, observed=observed)
        return bytes(data)


def build_wheel(source: Path, *, plugin_id: str, version: str, work_dir: Path) -> Path:
    """A wheel of `source` (returned as is when it already is one), built offline."""
    if source.is_file() and source.suffix == ".whl":
        return source
    if not source.is_dir():
        raise ArtifactError("build", f"source {source} of {plugin_id!r} is neither a"
                            " directory nor a .whl file", plugin_id=plugin_id)
    stage = work_dir / "src"
    if (source / "pyproject.toml").is_file() or (source / "setup.py").is_file():
        shutil.copytree(source, stage, ignore=IGNORED)
    elif (source / "__init__.py").is_file() and source.name.isidentifier():
        shutil.copytree(source, stage / source.name, ignore=IGNORED)
        (stage / "pyproject.toml").write_text(
            _bare_package_project(plugin_id, source.name, version), encoding="utf-8")
    else:
        raise ArtifactError("build", f"source {source} of {plugin_id!r} has no pyproject.toml,"
                            " setup.py or __init__.py: it is not a Python project or package",
                            plugin_id=plugin_id)
    out = work_dir / "wheel"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--no-index", "--quiet", "--wheel-dir", str(out), str(stage)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                              env=child_process_env(SOURCE_DATE_EPOCH=REPRODUCIBLE_EPOCH),
                              check=False)
    except subprocess.TimeoutExpired:
        raise ArtifactError("build", f"building {source} took over {BUILD_TIMEOUT_S} s",
                            plugin_id=plugin_id) from None
    wheels = sorted(out.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        output = (done.stderr or done.stdout or "").strip()[-2000:]
        raise ArtifactError("build", f"pip could not build {source} into a wheel: {output}",
                            plugin_id=plugin_id)
    return wheels[0]


def _bare_package_project(plugin_id: str, package: str, version: str) -> str:
    """A pyproject.toml for a package directory that has none."""
    try:
        version = str(Version(version))
    except InvalidVersion:
        version = "0.0.0"
    return (
        '[build-system]\nrequires = ["setuptools>=70.1"]\n'
        'build-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "pluginpool-plugin-{plugin_id}"\nversion = "{version}"\n\n'
        f'[tool.setuptools]\npackages = {{ find = {{ include = ["{package}", "{package}.*"] }} }}\n'
        '\n[tool.setuptools.package-data]\n"*" = ["*"]\n'
    )


SUPPORTED_COMPRESSION = frozenset((zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED))
"""What a wheel's members may be (PEP 427 names stored and deflated; bz2 and lzma would
reach decoders whose errors are their own)."""
UNPACKED_FACTOR = 10
"""An artifact may unpack to at most this many times PLUGINPOOL_MAX_ARTIFACT_BYTES (the
sizes its zip declares, checked before extracting): a zip bomb cannot fill a worker's disk."""


def check_wheel(data: bytes, *, plugin_id: str, max_bytes: int,
                sha256: str | None = None) -> None:
    """What a worker will unpack, checked whole, at register and again before unpacking: a
    zip (every member's data readable, its CRC right), with a .dist-info directory, no
    member named outside it (absolute, `..`), and unpacking to at most UNPACKED_FACTOR x
    `max_bytes`. ArtifactError `invalid` otherwise (before, a corrupt member registered and
    failed each job as an untyped runtime error; a zip bomb or a `../` member registered
    and failed, or was silently renamed, at the first job)."""
    def invalid(problem: str, **details: Any) -> ArtifactError:
        return ArtifactError("invalid", f"artifact of {plugin_id!r} {problem}",
                             plugin_id=plugin_id, sha256=sha256, **details)

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            unpacked = sum(info.file_size for info in members)
            if unpacked > UNPACKED_FACTOR * max_bytes:
                raise invalid(f"unpacks to {unpacked} bytes, over {UNPACKED_FACTOR} x "
                              "PLUGINPOOL_MAX_ARTIFACT_BYTES", unpacked_bytes=unpacked)
            for info in members:
                if info.flag_bits & 0x1 or info.compress_type not in SUPPORTED_COMPRESSION:
                    raise invalid(f"has a member encrypted or compressed in a way wheels are "
                                  f"not: {info.filename[:200]!r}")
                parts = info.filename.replace("\\", "/").split("/")
                if info.filename.startswith(("/", "\\")) or ".." in parts or (
                        parts and parts[0].endswith(":")):
                    raise invalid(f"has a member named outside it: {info.filename[:200]!r}")
            damaged = archive.testzip()
    except ArtifactError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError,
            RuntimeError, OSError, LookupError) as exc:  # what a damaged zip raises
        # (ValueError: a negative seek in its directory; UnicodeDecodeError: its names)
        raise invalid(f"is not a readable zip ({type(exc).__name__}: {str(exc)[:200]})") \
            from None
    if damaged is not None:
        raise invalid(f"has a damaged member (bad CRC): {damaged[:200]!r}")
    if not any(".dist-info/" in info.filename for info in members):
        raise invalid("has no .dist-info: not a wheel")


def publish_sources(specs: list[PluginSpec], store: ArtifactStore) -> list[PluginSpec]:
    """Build and publish the artifact of every spec that names a `source`; the returned
    specs record it. Runs before the specs are published, so no worker ever sees a spec
    whose artifact is not in Redis yet."""
    published = []
    built: dict[tuple[str, str], ArtifactRef] = {}  # plugins sharing one package: one build
    for spec in specs:
        if spec.source is None:
            published.append(spec)
            continue
        ref = built.get((spec.source, spec.version))
        if ref is not None:
            published.append(spec.model_copy(update={"artifact": ref}))
            continue
        with tempfile.TemporaryDirectory(prefix=f"pp-build-{spec.id}-") as work:
            wheel = build_wheel(Path(spec.source), plugin_id=spec.id, version=spec.version,
                                work_dir=Path(work))
            data = wheel.read_bytes()
            if len(data) > store.max_bytes:  # before parsing a possibly huge file
                raise ArtifactTooLargeError(plugin_id=spec.id, size_bytes=len(data),
                                            limit_bytes=store.max_bytes)
            check_wheel(data, plugin_id=spec.id, max_bytes=store.max_bytes)
            ref = store.publish(data, plugin_id=spec.id, filename=wheel.name)
        built[(spec.source, spec.version)] = ref
        published.append(spec.model_copy(update={"artifact": ref}))
    return published
